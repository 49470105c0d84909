"""dataprune: make image training sets smaller and better."""

__version__ = "0.1.0"
