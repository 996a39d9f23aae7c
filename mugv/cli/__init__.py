"""The `mugv` command line."""
