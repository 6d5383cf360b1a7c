"""Host preparation: packages, daemons, and accelerator detection (KVM vs TCG)."""
