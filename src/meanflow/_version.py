"""The package version (one place; ``meanflow.__version__`` and exported models read it)."""

__version__ = "0.1.0"
