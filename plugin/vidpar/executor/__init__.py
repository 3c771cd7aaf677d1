"""vidpar.executor."""
