"""Moved to :mod:`svirt.safefs` (the ground floor); the old name for the other branches."""

from svirt.safefs import (  # moved: svirt.safefs (re-export removed at merge)
    OPEN_RETRIES,
    REMOVE_BATCH,
    REMOVE_MAX_ENTRIES,
    open_beneath,
    open_child_dir,
    open_dir,
    remove_tree,
)

__all__ = ["OPEN_RETRIES", "REMOVE_BATCH", "REMOVE_MAX_ENTRIES", "open_beneath",
           "open_child_dir", "open_dir", "remove_tree"]
