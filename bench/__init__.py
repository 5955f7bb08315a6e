"""svirt benchmarks: svirt against the raw hypervisor and against libvirt.

Benchmarks report; they never assert timings.  Run ``bench/run`` (see
``bench/README.rst``).
"""
