"""Byte-range reading: block cache, aligned reads, partition windows."""
