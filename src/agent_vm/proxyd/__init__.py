"""The egress proxy program (``daemon.py``): run in its own environment, never imported."""
