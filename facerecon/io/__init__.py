"""Input/output helpers: atomic writes, image loading, HDF5 stores."""
