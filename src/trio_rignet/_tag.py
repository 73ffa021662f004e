"""The trio-rignet tag: who sent a message, and which one it is, in JSON whitespace.

Every message a trio-rignet endpoint originates (not its echoes, not its error
reports) carries a tag just before its closing bracket::

    [2, "2024-01-01_1_mouse", null\\t\\n \\r ... \\t\\t]
                                  ^ marker, then 2 bits per whitespace byte

It is JSON whitespace, so every JSON reader (iblutil 1.20.0 included) parses
the message unchanged, and an echo returns it byte for byte. It carries:

- ``session``: 32 random bits chosen when the endpoint opens. An endpoint
  recognises its own messages by it, forever and without keeping records,
  so an echo that comes back however late is never taken for a new message.
- ``seq``: a 32-bit counter per (endpoint, peer), so a receiver can tell a
  retransmission of a message (same session and seq) from a new message with
  the same content, and drop duplicates with a small sliding window.
- ``ref`` (optional): the ``seq`` of the message this one answers (a rig's
  completion update names the signal it completes), for call correlation.
- a version and flags; unused flag bits are reserved for authentication (a
  MAC over the message with a per-lab key) without changing how tags read.

Layout, read backwards from the closing bracket: the last 4 whitespace bytes
hold ``version << 4 | flags``; before them the body (session, seq, a check
byte, then ref if flagged), and before the body one ``\\t`` marker. The check
byte is ``(session ^ seq ^ seq >> 8) & 0xFF ^ 0xA5``, so that random whitespace
rarely reads as a tag.
Whitespace digits: space 0, tab 1, CR 2, LF 3, most significant first, four
per byte. Pure code: no I/O.
"""

from __future__ import annotations

from typing import TypeAlias

__all__ = ["FLAG_REF", "VERSION", "Tag", "Tagger", "read_tag", "strip_tag"]

VERSION = 1
FLAG_REF = 0x1
"""The tag carries ``ref``, the seq of the message it answers."""

_DIGITS = b" \t\r\n"
_MARKER = 0x09  # '\t'
_TO_BASE4 = bytes.maketrans(_DIGITS, b"0123")
_SPELL = [bytes(_DIGITS[(b >> s) & 3] for s in (6, 4, 2, 0)) for b in range(256)]
"""Byte value -> its four whitespace digits."""

_HEADER_CHARS = 4
_BODY_CHARS = {0: 36, 1: 52}  # flags -> whitespace bytes of the body (72 or 104 bits)
_LAYOUTS = {
    _SPELL[VERSION << 4 | flags] + b"]": (flags, 1 + body + _HEADER_CHARS + 1)
    for flags, body in _BODY_CHARS.items()
}
"""A message's last 5 bytes (header and ``]``) -> (flags, bytes from the marker to the end)."""
_MASK32 = 0xFFFFFFFF


Tag: TypeAlias = "tuple[int, int, int | None]"
"""A tag's fields: ``(session, seq, ref)``; ``ref`` is None when the message answers none."""


def _spell32(value: int) -> bytes:
    spell = _SPELL
    return b"".join(
        (
            spell[value >> 24],
            spell[(value >> 16) & 0xFF],
            spell[(value >> 8) & 0xFF],
            spell[value & 0xFF],
        )
    )


class Tagger:
    """Tags the messages of one endpoint session (the session's digits are spelled once)."""

    __slots__ = ("_prefix", "session")

    def __init__(self, session: int) -> None:
        self.session = session & _MASK32
        self._prefix = b"\t" + _spell32(self.session)

    def tag(self, message: bytes, seq: int, ref: int | None = None) -> bytes:
        """``message`` (a JSON array, outer whitespace stripped) with a tag before its ``]``."""
        spell = _SPELL
        check = spell[((self.session ^ seq ^ (seq >> 8)) & 0xFF) ^ 0xA5]  # the check byte
        parts = [
            message[:-1],
            self._prefix,
            spell[seq >> 24],
            spell[(seq >> 16) & 0xFF],
            spell[(seq >> 8) & 0xFF],
            spell[seq & 0xFF],
            check,
            _HEADER0,
        ]
        if ref is not None:
            parts[-1] = _spell32(ref)
            parts.append(_HEADER1)
        return b"".join(parts)


_HEADER0 = _SPELL[VERSION << 4] + b"]"
_HEADER1 = _SPELL[VERSION << 4 | FLAG_REF] + b"]"


def read_tag(message: bytes) -> Tag | None:
    """The tag of ``message`` (outer whitespace stripped), or None if it has none."""
    layout = _LAYOUTS.get(message[-5:])  # -5: the header and the closing bracket
    if layout is None:
        return None
    flags, size = layout
    start = len(message) - size
    if start < 1 or message[start] != _MARKER:
        return None
    try:  # ValueError: a byte of the body is not whitespace
        value = int(message[start + 1 : -5].translate(_TO_BASE4), 4)
    except ValueError:
        return None
    ref = None
    if flags:
        ref = value & _MASK32
        value >>= 32
    session, seq = value >> 40, (value >> 8) & _MASK32
    if value & 0xFF != ((session ^ seq ^ (seq >> 8)) & 0xFF) ^ 0xA5:  # the check byte
        return None
    return (session, seq, ref)


def strip_tag(message: bytes) -> bytes:
    """``message`` without its tag (unchanged if it has none)."""
    tag = read_tag(message)
    if tag is None:
        return message
    size = _LAYOUTS[message[-5:]][1]
    return message[: len(message) - size] + b"]"
