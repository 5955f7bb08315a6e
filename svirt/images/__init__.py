"""Tiny guest images (kernel + busybox initramfs) built from Debian packages."""
