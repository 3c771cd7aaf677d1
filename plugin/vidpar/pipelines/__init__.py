"""vidpar.pipelines."""
