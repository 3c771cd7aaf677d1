"""vidpar.lightning."""
