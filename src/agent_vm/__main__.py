"""``python -m agent_vm`` is the ``agent-vm`` command."""

from agent_vm.quick import main

main()
