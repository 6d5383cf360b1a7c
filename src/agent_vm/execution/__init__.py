"""Execution: boot VMs from images, run commands in them, reap what crashed processes left."""
