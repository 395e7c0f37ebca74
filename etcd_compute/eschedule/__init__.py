"""The user's side: eschedule claims capacity in Placement and writes requests into etcd.

cli.py parses and prints; operations.py holds every command; claims.py talks to
Placement about candidates and claims; inputs.py checks what the user handed over.
It writes only requested state; it never imports the host's side (ecompute).
"""
