"""Guest image build and cache: debootstrap rootfs, kernel, initramfs, qcow2 base."""
