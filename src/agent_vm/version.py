"""The package's version, in a module of its own (imported by the entry points and the
guest's copy of the package face without importing anything else)."""

__version__ = "0.1.0"
