"""Pure parsers of what a guest disk holds: partition tables, filesystem signatures, LVM2 (its
metadata text, its on-disk structures, logical volumes as extent maps).

Every byte comes through the caller's `read(offset, length)` callback or as bytes; nothing here
does I/O, waits, or imports anything of ivdfs outside this package but `ivdfs.units`. The input
is untrusted: bounded reads, no exception because of what is read, a warning for what is
distrusted.
"""
