"""etcd-compute: Placement decides where, etcd carries what should happen, libvirt makes it so."""


def ecompute_main() -> None:
    """The `ecompute` console script, importing the daemon only when called.

    Worker processes are spawned, and a spawned child re-imports the parent's main
    script: pointing the script here keeps etcd3 and gRPC (about 20 MB) out of every
    worker, which only needs etcd_compute.worker.
    """
    from etcd_compute.compute import main
    main()
