"""libvirt layer: connection, VM lifecycle, domain XML templates, snapshots."""
