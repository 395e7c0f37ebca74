"""The seeded chaos run (issue 10): random operations and faults against a small cloud, then invariants.

    python3 -m devstack chaos --seconds N --seed S --hosts K [--hypervisor qemu|fake] [--libvirtds L]
                              [--settle S] [--faults a,b] [--placement postgresql [--conflict-retries R]]
                              [--keep] [-v]

The tests prove each fault alone; this run mixes them as production would. Every choice
(which operation, which fault, which instance or host, how long) comes from one
`random.Random(seed)` in one thread, so a seed replays the same sequence of choices; what
happens between them still depends on timing on a shared machine, so a seed reproduces a
run's shape, not its every interleaving (the printed timeline says what happened when).

The world (world.py) is the run's own: a 3-member etcd cluster (harness.EtcdCluster) that every
daemon and every eschedule knows all members of; K ecompute hosts (harness.Ecompute) with their
own files, a prefix of the run's own, lease_ttl 3 (fence margin 0.9: a host is evacuated once
DOWN for 3.9 s) and a long resync (60 s: a change a daemon's watch missed must show as a request
stuck, not be picked up quietly), with diskless domains (no NIC, no metadata server, no image:
such a domain starts in well under a second and idles in SeaBIOS); the stack's Placement (or,
with --placement postgresql, one of the run's own on PostgreSQL with 2 workers, where claims
race in the database) behind a loopback proxy that can answer 503 or hang. Each host reaches
etcd and Placement through links of its own (devstack/netfault.py: HostLinks), which the run
cuts in any of the proxies' modes while another host serves.

Where the domains run (hypervisors.py): with --hypervisor qemu (the default) the hosts take turns
on this machine's libvirtd and L - 1 libvirtds the run starts (devstack/libvirthost.py; L = 2 by
default), so one instance CAN run on two libvirtds at once, as two QEMU processes, which the
sampler tells apart by their mounts; with --hypervisor fake each host has a fake hypervisor of
its own (fake:///DIR: no QEMU, so many hosts are cheap) and the sampler reads its domain files.
Not libvirt's test:///default: its domains live inside each worker process, where nothing outside
it can see them, so nothing could check that no instance runs twice.

The rooms: book.py (the timeline and tallies), world.py, hypervisors.py, operations.py
(eschedule processes), faults.py, sampler.py (the copies of each instance, every 100 ms, for
invariant C), run.py (drive, settle, check), report.py. The invariants themselves are
etcd_compute/invariants.py's, checked during the run where they hold at every moment and at
the end where they hold once settled (run.py says which). C, "never two running copies", has
no window: the fence stops a cut-off host's domains before its lease can lapse and evacuation
waits longer than that, so no overlap at all is allowed; the sampler tells the run the moment
it sees one, and the report gives its seed, uuid, start, length and the timeline around it.

"An instance on two hosts" shows as two copies at once (C), as one instance requested of two
hosts, or as a domain whose owner (the host in its libvirt metadata) is not the host that etcd
says runs it (1); every look at the domains (1, 2, 5, 6, the teardown) reads each host's own
hypervisor. After N seconds everything is healed, resumed and restarted, the garbage records are
checked (ERROR in `eschedule list`) and removed, and once every instance has settled and the
world has held still for a few seconds the invariants are checked against etcd, Placement and
the hypervisors. Exit 1 on any violation. The teardown stops the run's libvirtds whatever
happened (and the next run stops those a killed run left).
"""
