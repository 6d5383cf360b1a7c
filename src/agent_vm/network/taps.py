"""Host-side names of sandbox interfaces.

The prefix is distinctive on purpose: the backstop and the observer match every
interface that starts with it, so no other interface on the host may.
"""

from __future__ import annotations

import hashlib

TAP_PREFIX = "agvm-"


def tap_name(vm_name: str) -> str:
    """Stable for a VM name and 15 characters (the kernel's limit)."""
    return TAP_PREFIX + hashlib.sha1(vm_name.encode()).hexdigest()[:10]  # noqa: S324
