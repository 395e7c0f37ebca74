"""etcd-compute: Placement decides where, etcd carries what should happen, libvirt makes it so."""
