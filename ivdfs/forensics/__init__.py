"""Forensic inspection: evidence hashes of what was served, a tamper-evident access journal.

`hashing`: SHA-256 and MD5 of a file computed from the reads that cover it in order, on pool
threads. `audit`: the hash-chained JSON-lines journal of who opened what and which bytes were
read, and its verification. Neither imports the tree: the tree and the commands use them.
"""
