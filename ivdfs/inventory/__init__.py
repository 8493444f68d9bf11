"""What exists in vSphere: datastores, IVDs and their snapshots."""
