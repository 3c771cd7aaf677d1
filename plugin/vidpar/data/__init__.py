"""vidpar.data."""
