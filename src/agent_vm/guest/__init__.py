"""Code that runs inside the VM: PID 1 init and the control agent (standard library only)."""
