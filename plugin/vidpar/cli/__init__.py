"""vidpar.cli."""
