from etcd_compute.api.server import main

main()
