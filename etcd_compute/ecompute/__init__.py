"""The host's side: ecompute registers its host in Placement and makes libvirt do what etcd asks.

daemon.py wires the rooms: liveness.py (the lease, and the proof that fence.py, a process
of its own, reads to stop the host's domains once it lapses), loop.py (the reconcile loop,
with backlog.py, what it has yet to do and when, and records.py, its compared writes),
pool.py (worker processes, each job within its deadline), services.py (supervised loops);
reconciler.py decides (pure functions); jobs.py is what crosses to the worker processes,
where worker.py runs them with a driver (driver.py: libvirtdriver.py, with domainxml.py,
networkxml.py and lifecycle.py; or fakedriver.py), images.py and configdrive.py;
inventory.py measures and registers the host. It writes only actual state; it never imports
the user's side.
"""


def main() -> None:
    """The `ecompute` console script, importing the daemon only when called.

    Worker processes are spawned, and a spawned child re-imports the parent's main
    script: pointing the script here keeps etcd3 and gRPC out of every worker.
    """
    from etcd_compute.ecompute.daemon import main as daemon_main
    daemon_main()
