"""Model architectures, one file per family, registered by architecture name."""
