"""Sans-IO framing of a TCP byte stream into messages.

iblutil writes JSON arrays back to back on a TCP stream with nothing between
them. :class:`StreamDecoder` finds where each array ends by tracking bracket
depth and string state; it never parses the JSON itself (that is
:func:`~trio_rignet.parse_message`'s job). It also accepts whitespace or
newlines between messages.

Whole messages nested at most four deep (every message of the protocol) are
found by one regular expression, in C; the rest (a message cut by a read, or
nested deeper) is scanned in Python, structural byte by structural byte. The
scan position is kept across calls, so total work is linear in the number of
bytes fed, however the stream is cut.
"""

from __future__ import annotations

import re
import sys

from ._errors import FramingError

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "StreamDecoder"]

DEFAULT_MAX_MESSAGE_SIZE = 1 << 20
"""Default limit on one framed message: 1 MiB."""

# Outside strings only brackets, braces and quotes matter; inside a string only
# the closing quote and backslash escapes do. All of these are ASCII, and UTF-8
# continuation bytes are never ASCII, so a multi-byte character split across
# reads needs no special care.
_STRUCTURAL = re.compile(rb'[\[\]{}"]')
_IN_STRING = re.compile(rb'["\\]')
_SKIP_WS = re.compile(rb"[ \t\r\n]*")
_OPEN = {0x5B: 0x5D, 0x7B: 0x7D}  # '[' -> ']', '{' -> '}'
_QUOTE = 0x22
_LBRACKET = 0x5B
_RBRACKET = 0x5D


def _whole_message(depth: int, star: bytes) -> bytes:
    """A regex matching one whole message whose brackets nest at most ``depth`` deep.

    Its loops are unrolled (``normal* (special normal*)*``) with alternatives
    that start on distinct bytes, so it matches in one way or not at all, in
    time linear in the bytes it reads. ``star`` is the repetition: ``*+``
    (possessive, Python 3.11+) fails on an unfinished message without
    backtracking; plain ``*`` is the same language, about 10x slower to fail.
    """
    normal = rb'[^\[\]{}"]' + star
    string = rb'"[^"\\]' + star + rb'(?:\\.[^"\\]' + star + rb")" + star + rb'"'
    inner = normal + rb"(?:" + string + normal + rb")" + star
    for _ in range(depth - 1):
        special = rb"(?:" + string + rb"|\[" + inner + rb"\]|\{" + inner + rb"\})"
        inner = normal + rb"(?:" + special + normal + rb")" + star
    return rb"\[" + inner + rb"\]"


_WHOLE_DEPTH = 4
_STAR = b"*+" if sys.version_info >= (3, 11) else b"*"
_WHOLE = _whole_message(_WHOLE_DEPTH, _STAR)
_ONE = re.compile(rb"[ \t\r\n]*(" + _WHOLE + rb")[ \t\r\n]*", re.DOTALL).fullmatch
"""Matches one whole message with whitespace around it, and nothing else."""
_RUN = re.compile(rb"(?:[ \t\r\n]*" + _WHOLE + rb")" + _STAR + rb"[ \t\r\n]*", re.DOTALL).match
"""Matches whitespace and whole messages, as many as follow one another."""
_MESSAGES = re.compile(rb"[ \t\r\n]*(" + _WHOLE + rb")", re.DOTALL).findall
"""The whole messages of a run that :data:`_RUN` matched."""


class StreamDecoder:
    """Split a byte stream of back-to-back JSON arrays into messages.

    >>> decoder = StreamDecoder()
    >>> decoder.feed(b'[1, null][2, "2022-01-01_1_subj')
    [b'[1, null]']
    >>> decoder.feed(b'ect", null]\\n')
    [b'[2, "2022-01-01_1_subject", null]']

    Args:
        max_message_size: the longest message accepted, in bytes. The decoder
            never holds more than this plus the chunk being fed.

    A decoder that raised :class:`~trio_rignet.FramingError` stays failed:
    the stream cannot be resynchronised, so the connection should be closed.
    """

    __slots__ = ("_buf", "_closers", "_error", "_escape", "_in_string", "_pos", "max_message_size")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if max_message_size < 2:
            raise ValueError(
                f"max_message_size must be at least 2 bytes (one '[]'), got {max_message_size}"
            )
        self.max_message_size = max_message_size
        self._buf = bytearray()  # the message being framed, from its '['
        self._pos = 0  # next byte of _buf to scan
        self._closers = bytearray()  # expected closing brackets, innermost last
        self._in_string = False
        self._escape = False  # the previous byte was a backslash inside a string
        self._error: FramingError | None = None

    @property
    def buffered(self) -> int:
        """Number of bytes held for an incomplete message."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add bytes from the stream; return every message they complete, in order.

        Each message is exactly the bytes the peer sent for it; whitespace
        between messages is dropped. ``data`` is not kept: the caller may
        reuse its buffer once this returns.

        Raises:
            FramingError: a byte cannot start a message, brackets do not match,
                or a message exceeds ``max_message_size``.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except FramingError as exc:
            self._error = exc
            self._buf.clear()
            raise

    def eof(self) -> None:
        """Declare the end of the stream.

        Raises:
            FramingError: the stream ended inside a message.
        """
        if self._error is not None:
            raise self._error
        if self._buf:
            n = len(self._buf)
            self._buf.clear()
            self._error = FramingError(f"stream ended inside a message ({n} bytes unterminated)")
            raise self._error

    def _feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        limit = self.max_message_size
        messages: list[bytes] = []
        src: bytes | bytearray | memoryview
        if self._buf:
            # Inside a message: continue scanning where the last feed stopped.
            self._buf += data
            src = self._buf
            pos = self._pos
        else:
            one = _ONE(data)
            if one is not None:  # the common case: one whole message
                message: bytes = one.group(1)
                if len(message) > limit:
                    raise FramingError(_too_long(len(message), limit))
                return [message]
            # Between messages: scan `data` itself, so that each message is
            # sliced out of it with a single copy.
            src = data
            pos = 0
        closers = self._closers
        in_string = self._in_string
        msg_start = 0
        n = len(src)
        while pos < n:
            if not closers:
                # Between messages: take the whole messages that follow.
                end = _RUN(src, pos).end()  # type: ignore[union-attr]  # matches always
                messages += _messages(src, pos, end, limit)
                pos = msg_start = end
                if pos == n:
                    break
                if src[pos] != _LBRACKET:
                    raise FramingError(_bad_start(src, pos))
                closers.append(_RBRACKET)
                pos += 1
                continue
            if self._escape:
                self._escape = False
                pos += 1
                continue
            if in_string:
                m = _IN_STRING.search(src, pos)
                if m is None:
                    pos = n
                    break
                pos = m.end()
                if src[pos - 1] == _QUOTE:
                    in_string = False
                else:
                    self._escape = True
                continue
            m = _STRUCTURAL.search(src, pos)
            if m is None:
                pos = n
                break
            i = m.start()
            pos = i + 1
            c = src[i]
            if c == _QUOTE:
                in_string = True
            elif c in _OPEN:
                closers.append(_OPEN[c])
            elif not closers or closers[-1] != c:
                raise FramingError(f"unbalanced {chr(c)!r} at byte {i - msg_start} of a message")
            else:
                closers.pop()
                if not closers:
                    if pos - msg_start > limit:
                        raise FramingError(_too_long(pos - msg_start, limit))
                    messages.append(bytes(src[msg_start:pos]))
                    msg_start = pos
        if n - msg_start > limit:
            raise FramingError(_too_long(n - msg_start, limit))
        if src is data:
            if msg_start < n:
                self._buf += memoryview(data)[msg_start:]
        else:
            del self._buf[:msg_start]
        self._pos = pos - msg_start
        self._in_string = in_string
        return messages


def _messages(src: bytes | bytearray | memoryview, start: int, end: int, limit: int) -> list[bytes]:
    """The whole messages of ``src[start:end]``, a run that :data:`_RUN` matched."""
    if end == start:
        return []
    found: list[bytes] = _MESSAGES(src, start, end)
    if len(max(found, key=len, default=b"")) > limit:
        first = next(len(message) for message in found if len(message) > limit)
        raise FramingError(_too_long(first, limit))
    return found


def _bad_start(buf: bytes | bytearray | memoryview, i: int) -> str:
    return (
        f"byte {bytes(buf[i : i + 1])!r} cannot start a message "
        "(expected '[' or whitespace between messages)"
    )


def _too_long(size: int, limit: int) -> str:
    return f"message longer than max_message_size ({size} > {limit} bytes)"
