"""ivdfs: read-only FUSE filesystem for VMware vSphere Improved Virtual Disk snapshots."""

__version__ = "0.1.0"
