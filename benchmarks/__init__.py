"""Benchmarks of fusedbun against its peers: ``python -m benchmarks.compare --help``."""
