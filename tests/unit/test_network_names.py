"""Tap name derivation: fits IFNAMSIZ, unique per slot and nic, readable."""

from __future__ import annotations

import itertools

import pytest

from svirt.errors import NetworkError
from svirt.launcher.network import IFNAMSIZ, tap_name


@pytest.mark.parametrize("name", ["a", "web", "a-very-long-guest-name-indeed", "x.y_z", "ü-ñ"])
@pytest.mark.parametrize("slot", [0, 9, 4095, 65535])
def test_tap_name_fits_ifnamsiz(name: str, slot: int) -> None:
    for index in range(8):
        tap = tap_name(name, slot, index)
        assert 0 < len(tap) <= IFNAMSIZ - 1
        assert tap.startswith(f"sv{slot}n{index}")
        assert all(c.isascii() and (c.isalnum() or c in "-_.") for c in tap)


def test_tap_names_are_unique_across_slots_and_nics() -> None:
    names = {tap_name("same-long-guest-name", slot, nic)
             for slot, nic in itertools.product(range(2000), range(8))}
    assert len(names) == 2000 * 8


def test_long_names_differ_by_hash() -> None:
    a = tap_name("guest-number-one-aaaa", 1, 0)
    b = tap_name("guest-number-one-bbbb", 1, 0)
    assert a != b


def test_no_room_is_an_error() -> None:
    with pytest.raises(NetworkError):
        tap_name("g", 10**12, 0)
