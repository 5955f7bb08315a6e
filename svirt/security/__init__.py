"""The pluggable security framework: one driver per model."""
