"""Forensic inspection: evidence hashes of what was served, a tamper-evident audit log.

`hashing`: SHA-256 and MD5 of a file computed from the reads that cover it in order, on pool
threads; `evidence`: the mount's source, and the hashes that reads complete. The audit log
(`--audit-log`) of who opened what and which bytes were read: `chain` (its hash-chained
JSON-lines format and verification), `access` (callers, opens and the ranges served),
`writer` (the thread that owns the file, failing closed). None imports the tree: the tree and
the commands use them. ("Journal", in ivdfs, is only the journal of what a mount holds.)
"""
