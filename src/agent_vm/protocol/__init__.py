"""Framed wire format shared by the host and the guest agent (standard library only)."""
