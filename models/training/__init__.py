"""Training code for the bundled models; never imported by the API or the worker."""
