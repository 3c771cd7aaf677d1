"""vidpar.nn."""
