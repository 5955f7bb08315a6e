"""Scripts that run inside the SELinux lab VM (see tests/lab/test_lab_svirt.py)."""
