"""agent-vm: run untrusted CLI coding agents inside real QEMU/KVM virtual machines.

The package root stays import-light on purpose: the guest image ships a copy of the
stdlib-only parts (``protocol``, ``guest``, ``errors``) with its own stub of this file.
"""

__version__ = "0.1.0"
