"""VDDK binding: the only package that touches libvixDiskLib."""
