"""svirt.termsafe against hostile byte streams: what a guest prints never
reaches the admin's terminal as an order (clipboard, queries, resets), a
sequence split across reads is no way around it, and the cost is linear."""

from __future__ import annotations

import random
import re
import time

import pytest

from svirt.termsafe import ConsoleFilter, Escaper, escape_bytes, escape_text

ESC = b"\x1b"
OSC52 = ESC + b"]52;c;cm0gLXJmIH4K" + b"\x07"  # base64 of "rm -rf ~"
OSC52_ST = ESC + b"]52;p;cm0gLXJmIH4K" + ESC + b"\\"
QUERIES = [
    ESC + b"[6n",  # DSR: cursor position report
    ESC + b"[5n",  # DSR: status
    ESC + b"[c", ESC + b"[0c", ESC + b"[>c", ESC + b"[=c",  # DA1, DA2, DA3
    ESC + b"[21t", ESC + b"[14t", ESC + b"[8;999;999t",  # title report, size, resize
    ESC + b"[?1$p",  # DECRQM
    ESC + b"[?u",  # kitty keyboard query
    ESC + b"[>0q",  # XTVERSION
    ESC + b"]11;?\x07", ESC + b"]4;1;?" + ESC + b"\\",  # colour queries
    ESC + b"P$q\"p" + ESC + b"\\",  # DECRQSS in a DCS
    ESC + b"P+q544e" + ESC + b"\\",  # XTGETTCAP
    ESC + b"Z",  # DECID
    ESC + b"c",  # RIS: full reset
    ESC + b"[?1000h", ESC + b"[?1004h", ESC + b"[?2004h",  # mouse, focus, paste reporting
    ESC + b"]0;you are root on prod\x07",  # title
    ESC + b"]8;;http://evil/\x07link" + ESC + b"]8;;\x07",  # hyperlink
    ESC + b"_Gf=100;AAAA" + ESC + b"\\",  # APC (kitty graphics)
    ESC + b"^privacy" + ESC + b"\\", ESC + b"Xsos" + ESC + b"\\",
    "\u009b6n".encode(),  # C1 CSI, UTF-8 encoded
    "\u009d52;c;QQ==\u009c".encode(),  # C1 OSC
    b"\x9b6n",  # a raw 8-bit CSI (invalid UTF-8)
]
#: what an interactive console must keep: text, colours, cursor moves, erasing
KEPT = [b"plain text ", ESC + b"[1;31m", b"red", ESC + b"[0m", ESC + b"[2J", ESC + b"[H",
        ESC + b"[10;20H", ESC + b"[K", ESC + b"[?25l", ESC + b"[?25h", ESC + b"[?1049h",
        ESC + b"[3A", ESC + b"[1;24r", ESC + b"7", ESC + b"8", ESC + b"(0", ESC + b"(B",
        ESC + b"[2 q", "caf\u00e9 \u2603\r\n".encode(), b"\t\x08\x07"]


def _hostile() -> bytes:
    bad = [OSC52, OSC52_ST, *QUERIES]
    return b"".join(KEPT[i % len(KEPT)] + q for i, q in enumerate(bad)) + b"".join(KEPT)


def _console(data: bytes, cuts: list[int] | None = None) -> bytes:
    f = ConsoleFilter()
    if cuts is None:
        return f.feed(data)
    out, last = [], 0
    for c in [*cuts, len(data)]:
        out.append(f.feed(data[last:c]))
        last = c
    return b"".join(out)


#: anything a terminal would obey as more than drawing
FORBIDDEN = re.compile("\x1b[\\]P_^XZc]|\x1b\\[[^a-zA-Z@`]*[nctpuq$]|\x1b\\[\\?(1000|1004|2004)"
                       "|[\x80-\x9f]")


def _assert_harmless(out: bytes) -> None:
    text = out.decode()  # valid UTF-8, always
    found = FORBIDDEN.search(re.sub("\x1b\\[[0-6]? q", "", text))  # DECSCUSR is kept
    assert found is None, (found, out)
    assert b"cm0gLXJmIH4K" not in out and b"QUJD" not in out
    assert b"evil" not in out and b"you are root" not in out


def test_console_drops_clipboard_queries_and_strings_but_keeps_drawing() -> None:
    data = _hostile()
    out = _console(data)
    _assert_harmless(out)
    for kept in KEPT:
        assert kept in out, kept
    assert b"link" in out  # the text of a hyperlink stays, its target goes


def test_console_sequences_split_across_every_read_boundary() -> None:
    data = _hostile()
    whole = _console(data)
    for cut in range(len(data) + 1):
        assert _console(data, [cut]) == whole, cut
    assert _console(data, list(range(1, len(data)))) == whole  # one byte per read
    rng = random.Random(22)  # noqa: S311 - seeded, not secret
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 30)))
        assert _console(data, cuts) == whole


def test_console_random_garbage_never_lets_an_order_through() -> None:
    """syzkaller-style: random mixes of introducers, terminators and payloads."""
    pieces = [ESC, b"[", b"]", b"P", b"\\", b"\x07", b"52;c;", b"6n", b"c", b"?", b"1000h",
              b"\x18", b"\x1a", b"\x9b", b"\xc2\x9b", b"\xc2", b"m", b"31", b";", b"A", b"\n"]
    rng = random.Random(1)  # noqa: S311 - seeded, not secret
    for _ in range(500):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 60)))
        out = _console(data, sorted(rng.sample(range(len(data) + 1), min(3, len(data) + 1))))
        _assert_harmless(re.sub(rb"\x1b\[[0-9;:]*[mABCDEFGHIZfdea`JKXP@LMSTrsu]", b"", out))


def test_console_an_unterminated_string_swallows_only_itself() -> None:
    f = ConsoleFilter()
    assert f.feed(ESC + b"]52;c;" + b"A" * 100000) == b""  # still inside the OSC
    assert f.feed(b"B" * 10 + b"\x07after") == b"after"
    assert f.feed(ESC + b"[" + b"1;" * 1000 + b"m" + b"ok") == b"ok"  # over-long CSI dropped


def test_escaper_shows_every_control_and_keeps_lines() -> None:
    data = OSC52 + b"line\r\nnext\rover\x08\x7f\xff\xfe" + "\u202eevil\u009b".encode() + b"\tx\n"
    out = escape_bytes(data)
    assert ESC not in out and b"\x07" not in out and b"\x08" not in out
    assert b"\\x1b]52;c;cm0gLXJmIH4K\\x07" in out
    assert b"line\r\nnext\\rover\\x08\\x7f\\xff\\xfe\\u202eevil\\x9b\tx\n" in out
    for query in QUERIES:
        assert ESC not in escape_bytes(query) and b"\x9b" not in escape_bytes(query)


def test_escaper_streams_crlf_and_utf8_split_anywhere() -> None:
    data = b"a\r\nb\r" + "\u00e9\u2603".encode() + b"\r\n" + ESC + b"[6n\r"
    whole = escape_bytes(data)
    assert whole == b"a\r\nb\\r\xc3\xa9\xe2\x98\x83\r\n\\x1b[6n\\r"
    for cut in range(len(data) + 1):
        e = Escaper()
        assert e.feed(data[:cut]) + e.feed(data[cut:]) + e.flush() == whole, cut


def test_escape_text_is_one_line() -> None:
    assert escape_text("host\n\x1b]52;c;QQ==\x07\u202e") == "host\\n\\x1b]52;c;QQ==\\x07\\u202e"
    assert escape_text("plain-host_1") == "plain-host_1"


@pytest.mark.parametrize("unit", [ESC + b"[", ESC + b"]", ESC + ESC, b"\x9b", ESC + b"[1;",
                                  b"a" * 7 + b"\x1b[31m", ESC + b"P" + ESC])
def test_linear_in_the_input(unit: bytes) -> None:
    """Twice the hostile input costs about twice the time (a quadratic
    filter would take 4x), and 256 KiB takes well under a second."""

    def cost(n: int) -> float:
        data = unit * (n // len(unit))
        t = time.perf_counter()
        ConsoleFilter().feed(data)
        escape_bytes(data)
        return time.perf_counter() - t

    cost(1 << 14)
    small, big = min(cost(1 << 17) for _ in range(3)), min(cost(1 << 18) for _ in range(3))
    assert big < 3.0 * small + 0.01, (small, big)
    assert big < 1.0, big
