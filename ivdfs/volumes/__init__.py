"""Guest volumes of snapshots: ``volumes/<n>`` symlinks to read-only mounts (issue 6).

`base` holds the request/answer types the tree speaks; `kernel` mounts partitions itself (loop
devices on our own ``disk.raw``), `vixmntapi` lets VMware's VixMntapi do it.
"""
