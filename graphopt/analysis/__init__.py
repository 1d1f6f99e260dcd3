"""Read-only analyses of models and graphs: quality (perplexity, divergence), ..."""
