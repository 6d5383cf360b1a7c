"""Where the host and the guest agent meet: the names both sides must agree on.

Standard library only and import-free: the guest copies this file, and a mismatch here
is a guest that boots and is never heard from.
"""

# virtio-serial port name (libvirt <channel><target name=...>, /sys/class/virtio-ports/*/name)
CHANNEL_NAME = "org.agentvm.control"
# AF_VSOCK port the agent listens on (hosts with vhost-vsock only)
VSOCK_PORT = 9999
# kernel command line switch that makes the agent use vsock instead of virtio-serial
VSOCK_CMDLINE_FLAG = "agentvm.transport=vsock"
# 9p mount tag of the workspace share (libvirt <filesystem><target dir=...>)
SHARE_TAG = "agentvm_share"
# where the workspace appears inside the share: the host mounts the user's directory there
SHARE_WORKSPACE = "ws"
# the bulk lane inside the share: a small tmpfs the host mounts for file streams
SHARE_STAGING = "xfer"
# an image's run-time defaults (environment, user, working directory), written by a
# recipe build; read by the agent for every command that does not say otherwise
IMAGE_DEFAULTS = "/etc/agent-vm/image.json"
