"""Subcommands other than mount: ls, snapshot, check, umount, end-access."""
