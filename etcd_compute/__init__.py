"""etcd-compute: Placement decides where, etcd carries what should happen, libvirt makes it so.

Two sides and the floor they share:
    eschedule/   the user's side: claims in Placement, writes requests into etcd
    ecompute/    the host's side: reconciles requests into libvirt domains
    contract.py, states.py      keys, value types and the state machine both sides obey
    store.py, etcd.py, placement.py, config.py, errors.py, guestdata.py   shared plumbing
"""
