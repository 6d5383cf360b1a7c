"""What ``agent-vm run`` tells a shell, in one place (the fast path and the full CLI):
the command's own exit code, or one of these."""

EXIT_TIMEOUT = 124  # the command ran out of time (as timeout(1) says)
EXIT_AGENT_VM_ERROR = 125  # agent-vm itself failed (as docker run says)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM (128 + SIGINT)


def exit_status(exit_code: int | None, signum: int | None) -> int:
    """A shell's way: the exit code, or 128+N when signal N ended the command."""
    return exit_code if exit_code is not None else 128 + (signum or 0)
