"""The seeded chaos run (issue 10): random operations and faults against a small cloud, then invariants.

    python3 -m devstack chaos --seconds N --seed S --hosts K [--settle S] [--faults a,b]
                              [--placement postgresql [--conflict-retries R]] [--keep] [-v]

The tests prove each fault alone; this run mixes them as production would. Every choice
(which operation, which fault, which instance or host, how long) comes from one
`random.Random(seed)` in one thread, so a seed replays the same sequence of choices; what
happens between them still depends on timing on a shared machine, so a seed reproduces a
run's shape, not its every interleaving (the printed timeline says what happened when).

The world (world.py) is the run's own: a 3-member etcd cluster (harness.EtcdCluster) that every
daemon and every eschedule knows all members of; K ecompute hosts (harness.Ecompute) with their
own files, a prefix of the run's own, lease_ttl 3 and a long resync (60 s: a change a daemon's
watch missed must show as a request stuck, not be picked up quietly), on qemu:///system with
diskless domains (no NIC, no metadata server, no image: such a domain starts in well under a
second and idles in SeaBIOS); the stack's Placement (or, with --placement postgresql, one of
the run's own on PostgreSQL with 2 workers, where claims race in the database) behind a
loopback proxy that can answer 503 or hang. Not libvirt's test:///default: its domains live
inside each worker process, vanish with it and cannot be seen from outside, so nothing could
check that no domain runs on two hosts.

The rooms: book.py (the timeline and tallies), world.py, operations.py (eschedule processes),
faults.py, sampler.py (the QEMU processes, every 100 ms, for invariant C), run.py (drive, settle,
check), report.py. The invariants themselves are etcd_compute/invariants.py's, checked during
the run where they hold at every moment and at the end where they hold once settled (run.py
says which).

All K hosts share this machine's libvirtd, where one uuid names at most one domain, so "an
instance on two hosts" shows as two QEMU processes with one uuid (C), as one instance requested
of two hosts, or as a domain whose owner (the host in its libvirt metadata) is not the host that
etcd says runs it (1). After N seconds everything is resumed and restarted, the garbage records
are checked (ERROR in `eschedule list`) and removed, and once every instance has settled and the
world has held still for a few seconds the invariants are checked against etcd, Placement and
libvirt. Exit 1 on any violation.
"""
