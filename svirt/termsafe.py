"""Guest bytes on the admin's terminal: what a hostile guest prints is data.

A guest owns everything it writes to its console.  Written raw to a
terminal, some of it is not text but orders: OSC 52 sets the clipboard,
queries (``ESC[6n``, ``ESC[c``, ``ESC]11;?``, DECRQSS in a DCS) make the
terminal type its answer into the console's input, that is, into the guest,
and others retitle, resize or reset the window.  Two filters, both streaming
(a sequence split across reads is handled as if it came in one) and linear
in their input (runs of plain text are copied in bulk; nothing is searched
twice; a sequence is buffered only up to a few dozen bytes):

- :class:`Escaper` (``svirt logs``, and :func:`escape_text` for one-line
  values such as etcd's in ``list --cluster``): every control character
  but newline, tab and the CR of a CRLF is shown as an escape (``\\x1b``,
  ``\\r``, ``\\u202e``), invalid UTF-8 as ``\\xNN``; nothing reaches the
  terminal as an order.
- :class:`ConsoleFilter` (``svirt console``): an interactive console must
  keep working, so ordinary output, colours (SGR), cursor movement, erasing,
  scroll regions, the alternate screen and the cursor's shape pass; every
  OSC (clipboard, titles, colour queries, hyperlinks), DCS, SOS, PM and APC
  string is dropped whole, as is every CSI that is not on the allow-list
  (device status and attribute queries, window operations, mouse/focus/paste
  reporting modes, DECRQM), ESC Z (DECID), ESC c (reset), the C1 controls
  and the C0 controls other than BEL, BS, TAB, LF, VT, FF and CR.

Floor 1: imports nothing of svirt.
"""

from __future__ import annotations

import codecs
import re

ESC = "\x1b"
#: the longest CSI kept whole; a longer one is dropped (no real one is this long)
MAX_CSI = 64
#: C0 controls an interactive console keeps: BEL, BS, TAB, LF, VT, FF, CR
_KEEP_C0 = frozenset("\x07\x08\t\n\x0b\x0c\r")
_CAN_SUB = frozenset("\x18\x1a")
#: CSI finals that only draw (with plain numeric parameters)
_DRAW_FINALS = frozenset("mABCDEFGHIZfdea`JKXP@LMSTrsu")
_NUMERIC = re.compile(r"[0-9;:]*")
#: DEC private modes that change the picture only: cursor keys, origin, wrap,
#: blinking and visible cursor, the alternate screen (no reporting mode)
_SAFE_DEC_MODES = frozenset({1, 6, 7, 12, 25, 47, 1047, 1048, 1049})
_SAFE_ANSI_MODES = frozenset({4, 20})
#: ESC + one byte that is kept: save/restore cursor, index, next line,
#: reverse index, tab set, keypad modes
_SIMPLE_ESCAPES = frozenset("78DEHM=>")

# what plain text runs up to: a C0 or C1 control, DEL
_CONSOLE_SPECIAL = re.compile("[\x00-\x1f\x7f-\x9f]")
_STRING_END = re.compile("[\x07\x18\x1a\x1b]")

# what the escaper shows as an escape: every control (C0 but TAB and LF, DEL,
# C1), the bidirectional overrides that reorder what follows on screen, and
# undecodable bytes (surrogate escapes)
_ESCAPED = re.compile("\r\n|[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e"
                      "\u2066-\u2069\udc80-\udcff]")
_ESCAPED_ONE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e"
                               "\u2066-\u2069\udc80-\udcff]")
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t", ESC: "\\x1b"}


def _escape_char(c: str) -> str:
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_text(text: str) -> str:
    """``text`` on one line with every control escaped (newlines too): for
    values shown in tables and one-line messages."""
    return _ESCAPED_ONE_LINE.sub(lambda m: _escape_char(m.group()), text)


def escape_bytes(data: bytes) -> bytes:
    """The whole of ``data`` through an :class:`Escaper`."""
    esc = Escaper()
    return esc.feed(data) + esc.flush()


class Escaper:
    """Escapes a byte stream for a terminal (``svirt logs``); see the module."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self._cr = False  # the last chunk ended in CR: is it a CRLF?

    def feed(self, data: bytes) -> bytes:
        return self._text(self._decoder.decode(data)).encode("utf-8", "surrogateescape")

    def flush(self) -> bytes:
        """What is held back (a CR at the very end, half a UTF-8 character)."""
        text = self._text(self._decoder.decode(b"", final=True))
        if self._cr:
            self._cr = False
            text += "\\r"
        return text.encode("utf-8", "surrogateescape")

    def _text(self, text: str) -> str:
        if self._cr:
            self._cr = False
            text = "\r" + text
        if text.endswith("\r"):
            self._cr = True
            text = text[:-1]
        return _ESCAPED.sub(_escape_match, text)


def _escape_match(m: re.Match[str]) -> str:
    c = m.group()
    return c if c == "\r\n" else _escape_char(c)


# ConsoleFilter states
_GROUND, _ESCAPE, _CHARSET, _CSI, _CSI_DROP, _STRING, _STRING_ESC = range(7)


def _csi_allowed(params: str, final: str) -> bool:
    """A CSI (``params`` between ``ESC[`` and ``final``) that only draws."""
    if final in _DRAW_FINALS:
        return _NUMERIC.fullmatch(params) is not None
    if final in "hl":
        private = params.startswith("?")
        body = params[1:] if private else params
        if not re.fullmatch(r"[0-9]+(;[0-9]+)*", body):
            return False
        allowed = _SAFE_DEC_MODES if private else _SAFE_ANSI_MODES
        return all(int(n) in allowed for n in body.split(";"))
    if final == "q":  # DECSCUSR: the cursor's shape ("CSI 2 SP q")
        return re.fullmatch(r"[0-6]? ", params) is not None
    return False


class ConsoleFilter:
    """Filters a console byte stream for an interactive terminal
    (``svirt console``); see the module.  Output is UTF-8 (invalid input
    bytes become U+FFFD)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._state = _GROUND
        self._seq: list[str] = []  # the CSI or charset escape being read
        self._osc = False  # the string being dropped is an OSC (BEL ends it too)
        #: state the guest left in the terminal through what was passed, which
        #: :meth:`reset` undoes (alternate screen, scroll region, origin mode)
        self._left: set[str] = set()

    def feed(self, data: bytes) -> bytes:
        return self._filter(self._decoder.decode(data)).encode()

    def reset(self) -> bytes:
        """What puts the terminal back as the guest found it, for the end of
        a console: attributes (concealed text, colours), the character set
        (DEC line drawing), insert and newline modes, autowrap, the cursor's
        visibility, shape and keys, the keypad; and, when the guest set them,
        the scroll region, origin mode and the alternate screen; then this
        state is what a later restore of the cursor (ESC 8) brings back.  Without it
        a guest leaves the admin's own shell drawing concealed or garbled."""
        out = [f"{ESC}[0m{ESC}(B{ESC})B{ESC}[4l{ESC}[20l{ESC}[?7h{ESC}[?25h{ESC}[?12l"
               f"{ESC}[?1l{ESC}>{ESC}[0 q"]
        if "origin" in self._left:
            out.append(f"{ESC}[?6l")
        if "region" in self._left:
            out.append(f"{ESC}[r")
        for mode in ("1049", "1047", "47"):
            if mode in self._left:
                out.append(f"{ESC}[?{mode}l")
        # last: save this clean state as the saved cursor (DECSC keeps the
        # attributes and character set too), so a later program's bare
        # restore (ESC 8) does not bring back what the guest saved with ESC 7
        out.append(f"{ESC}7")
        self._left.clear()
        return "".join(out).encode()

    def _filter(self, text: str) -> str:
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            state = self._state
            if state == _GROUND:
                m = _CONSOLE_SPECIAL.search(text, i)
                if m is None:
                    out.append(text[i:])
                    break
                out.append(text[i:m.start()])
                c = text[m.start()]
                i = m.start() + 1
                if c == ESC:
                    self._state = _ESCAPE
                elif c in _KEEP_C0:
                    out.append(c)
                # anything else (other C0, DEL, C1 such as U+009B CSI) is dropped
                continue
            if state in (_STRING, _STRING_ESC):
                if state == _STRING_ESC:
                    c = text[i]
                    if c == "\\":  # ST: the string ends
                        self._state = _GROUND
                        i += 1
                    elif c == ESC:
                        i += 1
                    else:  # ESC then another byte: a new escape sequence begins
                        self._state = _ESCAPE
                    continue
                m = _STRING_END.search(text, i)
                if m is None:
                    break  # all of it is the string's: dropped
                c = m.group()
                i = m.end()
                if c == ESC:
                    self._state = _STRING_ESC
                elif c in _CAN_SUB or (c == "\x07" and self._osc):
                    self._state = _GROUND
                continue
            c = text[i]
            i += 1
            if state == _ESCAPE:
                self._escape(c, out)
            elif state == _CHARSET:
                if c in "B0" and self._seq[0] in "()":
                    out.append(ESC + self._seq[0] + c)
                self._state = _GROUND
                if c == ESC:
                    self._state = _ESCAPE
            elif state == _CSI:
                self._csi(c, out)
            elif state == _CSI_DROP:
                if "\x40" <= c <= "\x7e" or c in _CAN_SUB:
                    self._state = _GROUND
                elif c == ESC:
                    self._state = _ESCAPE
        return "".join(out)

    def _escape(self, c: str, out: list[str]) -> None:
        """The byte after an ESC."""
        self._state = _GROUND
        if c == "[":
            self._state, self._seq = _CSI, []
        elif c == "]":
            self._state, self._osc = _STRING, True
        elif c in "PX^_":  # DCS, SOS, PM, APC
            self._state, self._osc = _STRING, False
        elif c in "()*+":
            self._state, self._seq = _CHARSET, [c]
        elif c in _SIMPLE_ESCAPES:
            out.append(ESC + c)
        elif c == ESC:
            self._state = _ESCAPE
        elif c in _KEEP_C0:  # a control inside an escape is carried out at once
            out.append(c)
            self._state = _ESCAPE
        # anything else (ESC c reset, ESC Z identify, ...) is dropped

    def _csi(self, c: str, out: list[str]) -> None:
        """One byte of a CSI: parameters and intermediates, then the final."""
        if "\x20" <= c <= "\x3f":
            self._seq.append(c)
            if len(self._seq) > MAX_CSI:
                self._state = _CSI_DROP
        elif "\x40" <= c <= "\x7e":
            params = "".join(self._seq)
            if _csi_allowed(params, c):
                out.append(f"{ESC}[{params}{c}")
                if c == "r":
                    self._left.add("region")
                elif c == "h" and params.startswith("?"):
                    modes = set(params[1:].split(";"))
                    self._left.update(m for m in ("1049", "1047", "47") if m in modes)
                    if "6" in modes:
                        self._left.add("origin")
            self._state = _GROUND
        elif c == ESC:
            self._state = _ESCAPE
        elif c in _KEEP_C0:
            out.append(c)
        else:  # CAN, SUB, another control, DEL or non-ASCII: the sequence is void
            self._state = _GROUND
