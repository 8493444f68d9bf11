"""The pyfuse3 adapter: the only place domain exceptions become errno values."""
