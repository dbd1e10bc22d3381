"""attncc's version, in a module of its own so that modules inside the package read it
without importing the package face (attncc/__init__.py) from below."""

__version__ = "0.1.0"
