"""Development tooling: the local stack, the offline test guest, the demo and the test harness.

Lives beside the runtime packages, not in them: setup.py installs only etcd_compute and
md_server, so nothing here ships to a compute host, and no runtime module imports it.
`python3 -m devstack ...` runs the local stack (see devstack/localstack.py).
"""
