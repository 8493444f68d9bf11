"""The filesystem tree, independent of FUSE."""
