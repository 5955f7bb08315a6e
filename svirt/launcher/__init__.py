"""Turning a spec into a confined, supervised process."""
