"""The package version: a leaf module, so nothing imports the package root to read it."""
__version__ = "0.1.0"
