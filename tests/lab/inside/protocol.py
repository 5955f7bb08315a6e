"""What the in-lab checks and the host side agree on (no imports: both load it)."""

#: written to the kernel log before each phase: AVC denials after it belong to it
PHASE_PREFIX = "svirt-lab-phase: "
#: one output line per check: this prefix, then the check's result as JSON
RESULT_PREFIX = "SVIRT-LAB-CHECK "
