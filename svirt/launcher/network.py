"""Taps for guests (see the networking issue): create, own, attach, delete.

pyroute2 is imported only when a guest has a nic (it costs ~100 ms).
"""

from __future__ import annotations


def delete_tap(name: str, netns: str | None = None) -> bool:
    """Delete tap ``name`` (in ``netns``); False when it was already gone."""
    from pyroute2 import IPRoute, NetNS

    ipr = NetNS(netns) if netns else IPRoute()
    try:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return False
        ipr.link("del", index=idx[0])
        return True
    finally:
        ipr.close()
