"""Tests of the sans-IO TCP framing (:class:`trio_rignet.StreamDecoder`).

Besides example-based tests, Hypothesis checks that any valid stream is framed
exactly however it is cut, that arbitrary bytes only ever raise FramingError,
that memory stays bounded, and that the decoder agrees byte for byte with a
naive reference state machine written below.
"""

from __future__ import annotations

import doctest
import itertools
import json
import re
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import trio_rignet
import trio_rignet._framing as framing_module
from trio_rignet import FramingError, RignetError, StreamDecoder
from trio_rignet._framing import DEFAULT_MAX_MESSAGE_SIZE

# --------------------------------------------------------------------------- helpers

WHITESPACE = b" \t\r\n"


def feed_all(decoder: StreamDecoder, chunks: list[bytes]) -> list[bytes]:
    """Feed every chunk and return all messages, in order."""
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


def one_byte_chunks(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def reference_frame(data: bytes, limit: int) -> tuple[list[tuple[bytes, int]], int | None, int]:
    """A deliberately naive framer, one byte at a time.

    Returns ``(messages, error_index, buffered)``: each message with the index
    of its last byte, the index of the byte at which the stream becomes invalid
    (or None), and the length of the unfinished message at the end.
    """
    messages: list[tuple[bytes, int]] = []
    current = bytearray()
    closers: list[int] = []
    in_string = escape = False
    for i, byte in enumerate(data):
        if not current:
            if byte in WHITESPACE:
                continue
            if byte != ord("["):
                return messages, i, 0
        current.append(byte)
        if in_string:
            if escape:
                escape = False
            elif byte == ord("\\"):
                escape = True
            elif byte == ord('"'):
                in_string = False
        elif byte == ord('"'):
            in_string = True
        elif byte == ord("["):
            closers.append(ord("]"))
        elif byte == ord("{"):
            closers.append(ord("}"))
        elif byte in b"]}":
            if not closers or closers[-1] != byte:
                return messages, i, 0
            closers.pop()
        if len(current) > limit:
            return messages, i, 0
        if not closers:
            messages.append((bytes(current), i))
            current.clear()
    return messages, None, len(current)


# --------------------------------------------------------------------------- strategies

# Strings rich in the characters that matter to framing, plus any non-surrogate
# character (so ensure_ascii=False emits multi-byte UTF-8).
json_text = st.text(
    alphabet=st.one_of(
        st.sampled_from('[]{}"\\,: \n\t\r/\x00\x1f\u00e9\u20ac\U0001f600'),
        st.characters(codec="utf-8"),
    ),
    max_size=12,
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(json_text, children, max_size=4)
    ),
    max_leaves=12,
)
json_messages = st.builds(
    lambda code, rest: [code, *rest], st.integers(), st.lists(json_values, max_size=3)
)

ENCODERS: list[Callable[[Any], bytes]] = [
    lambda m: json.dumps(m).encode(),
    lambda m: json.dumps(m, separators=(",", ":")).encode(),
    lambda m: json.dumps(m, ensure_ascii=False).encode(),
]
SEPARATORS = [b"", b" ", b"\n", b"\r\n", b"\t"]


@st.composite
def encoded_streams(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    """Encoded messages and the stream carrying them back to back."""
    messages = draw(st.lists(json_messages, max_size=6))
    encoded = [draw(st.sampled_from(ENCODERS))(m) for m in messages]
    parts = [draw(st.sampled_from(SEPARATORS))]
    for raw in encoded:
        parts += [raw, draw(st.sampled_from(SEPARATORS))]
    return encoded, b"".join(parts)


@st.composite
def cuts_for(draw: st.DrawFn, data: bytes) -> list[int]:
    return draw(st.lists(st.integers(0, len(data)), max_size=max(1, min(len(data), 24))))


@st.composite
def chunked_streams(draw: st.DrawFn) -> tuple[list[bytes], bytes, list[bytes]]:
    encoded, stream = draw(encoded_streams())
    return encoded, stream, split_at(stream, draw(cuts_for(stream)))


# Bytes built from the characters framing cares about, so that random input
# gets past the first byte often.
framing_bytes = st.lists(
    st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b" ", b"\n", b"1", b",", b"\xc3\xa9"]),
    max_size=60,
).map(b"".join)
any_bytes = st.binary(max_size=200) | framing_bytes


@st.composite
def chunked_bytes(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    data = draw(any_bytes)
    return data, split_at(data, draw(cuts_for(data)))


# --------------------------------------------------------------------------- properties


@given(chunked_streams())
def test_valid_stream_any_cut_gives_exact_messages(
    case: tuple[list[bytes], bytes, list[bytes]],
) -> None:
    encoded, stream, chunks = case
    assert b"".join(chunks) == stream
    decoder = StreamDecoder()
    assert feed_all(decoder, chunks) == encoded
    assert decoder.buffered == 0
    decoder.eof()  # must not raise
    assert decoder.feed(b"") == []


@given(chunked_bytes())
def test_arbitrary_bytes_only_raise_framing_error(case: tuple[bytes, list[bytes]]) -> None:
    data, chunks = case
    decoder = StreamDecoder()
    out: list[bytes] = []
    try:
        for chunk in chunks:
            out.extend(decoder.feed(chunk))
        decoder.eof()
    except FramingError:
        pass
    for message in out:
        assert message.startswith(b"[")
        assert message.endswith(b"]")
        assert message in data


@given(st.binary(max_size=300))
def test_arbitrary_binary_at_once(data: bytes) -> None:
    decoder = StreamDecoder()
    try:
        messages = decoder.feed(data)
    except FramingError:
        return
    assert all(m.startswith(b"[") and m.endswith(b"]") for m in messages)


@given(st.integers(16, 256), chunked_bytes() | chunked_streams().map(lambda c: (c[1], c[2])))
def test_buffer_bounded_by_max_message_size(limit: int, case: tuple[bytes, list[bytes]]) -> None:
    _, chunks = case
    decoder = StreamDecoder(max_message_size=limit)
    for chunk in chunks:
        try:
            messages = decoder.feed(chunk)
        except FramingError:
            assert decoder.buffered == 0
            break
        assert decoder.buffered <= limit
        assert all(len(m) <= limit for m in messages)


@given(st.integers(16, 256), st.integers(-3, 3), st.data())
def test_message_over_limit_raises(limit: int, delta: int, data: st.DataObject) -> None:
    # [1,"aaa...a"] is 6 bytes plus the padding
    message = b'[1,"' + b"a" * (limit - 6 + delta) + b'"]'
    assert len(message) == limit + delta
    chunks = split_at(message, data.draw(cuts_for(message)))
    decoder = StreamDecoder(max_message_size=limit)
    if delta <= 0:
        assert feed_all(decoder, chunks) == [message]
    else:
        with pytest.raises(FramingError, match="longer than max_message_size"):
            feed_all(decoder, chunks)
        assert decoder.buffered == 0


@given(chunked_streams())
def test_one_byte_at_a_time_equals_all_at_once(
    case: tuple[list[bytes], bytes, list[bytes]],
) -> None:
    encoded, stream, _ = case
    at_once = StreamDecoder().feed(stream)
    byte_wise = feed_all(StreamDecoder(), one_byte_chunks(stream))
    assert byte_wise == at_once == encoded


@given(any_bytes)
def test_one_byte_at_a_time_equals_all_at_once_any_bytes(data: bytes) -> None:
    at_once = StreamDecoder()
    try:
        at_once_messages: list[bytes] | None = at_once.feed(data)
    except FramingError:
        at_once_messages = None
    byte_wise = StreamDecoder()
    try:
        byte_messages: list[bytes] | None = feed_all(byte_wise, one_byte_chunks(data))
    except FramingError:
        byte_messages = None
    assert byte_messages == at_once_messages
    assert byte_wise.buffered == at_once.buffered


@given(st.integers(2, 64), chunked_bytes())
def test_matches_reference_framer(limit: int, case: tuple[bytes, list[bytes]]) -> None:
    """Chunked feeding agrees with the naive framer on messages, errors and buffer."""
    data, chunks = case
    expected, error_at, buffered = reference_frame(data, limit)
    decoder = StreamDecoder(max_message_size=limit)
    out: list[bytes] = []
    start = 0
    for chunk in chunks:
        end = start + len(chunk)
        try:
            out.extend(decoder.feed(chunk))
        except FramingError:
            # the chunk that raised holds the first invalid byte; everything
            # completed in earlier chunks was delivered
            assert error_at is not None
            assert start <= error_at < end
            assert out == [m for m, last in expected if last < start]
            return
        start = end
    assert error_at is None
    assert out == [m for m, _ in expected]
    assert decoder.buffered == buffered


def nesting_depth(message: bytes) -> int:
    """How deep the brackets of a well-framed message nest (strings skipped)."""
    depth = deepest = 0
    for byte in re.sub(rb'"(?:[^"\\]|\\.)*"', b"", message, flags=re.DOTALL):
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


@pytest.mark.parametrize("star", [b"*+", b"*"], ids=["possessive", "backtracking"])
@given(data=any_bytes | encoded_streams().map(lambda c: c[1].lstrip()))
def test_whole_message_regex_matches_reference(star: bytes, data: bytes) -> None:
    """The fast path's regex (either repetition) matches exactly the first message
    the naive framer finds at byte 0, when it nests at most _WHOLE_DEPTH deep."""
    if star == b"*+" and sys.version_info < (3, 11):
        pytest.skip("possessive repetition needs Python 3.11")
    pattern = framing_module._whole_message(framing_module._WHOLE_DEPTH, star)
    match = re.compile(pattern, re.DOTALL).match(data)
    expected, _, _ = reference_frame(data, len(data) + 1)
    first = expected[0][0] if expected and data.startswith(expected[0][0]) else None
    if first is not None and nesting_depth(first) <= framing_module._WHOLE_DEPTH:
        assert match is not None
        assert match.group() == first
    else:
        assert match is None


def test_messages_deeper_than_the_fast_path_framed_in_any_order() -> None:
    deep = b'[1, [[[[["]"]]]]], {"a": {"b": [{"c": "}"}]}}]'
    shallow = b'[2, "x", [3, {"y": [4]}]]'
    assert nesting_depth(deep) > framing_module._WHOLE_DEPTH
    assert nesting_depth(shallow) == framing_module._WHOLE_DEPTH
    stream = shallow + deep + b"\n" + shallow + b" " + deep + deep[:7]
    decoder = StreamDecoder()
    assert decoder.feed(stream) == [shallow, deep, shallow, deep]
    assert decoder.feed(deep[7:] + shallow) == [deep, shallow]
    assert decoder.buffered == 0


# --------------------------------------------------------------------------- examples


def test_docstring_examples() -> None:
    decoder = StreamDecoder()
    assert decoder.feed(b'[1, null][2, "2022-01-01_1_subj') == [b"[1, null]"]
    assert decoder.buffered == len(b'[2, "2022-01-01_1_subj')
    assert decoder.feed(b'ect", null]\n') == [b'[2, "2022-01-01_1_subject", null]']
    assert decoder.buffered == 0
    decoder.eof()


def test_module_doctests_pass() -> None:
    result = doctest.testmod(framing_module, verbose=False)
    assert result.attempted >= 2
    assert result.failed == 0


def test_public_names() -> None:
    assert trio_rignet.StreamDecoder is StreamDecoder
    assert trio_rignet.FramingError is FramingError
    assert issubclass(FramingError, ValueError)
    assert issubclass(FramingError, RignetError)
    assert StreamDecoder().max_message_size == DEFAULT_MAX_MESSAGE_SIZE == 1 << 20


def test_iblutil_stream_without_delimiters() -> None:
    stream = b'[2, "2022-01-01_1_subject", null][2, "2022-01-01_1_subject", null][4, null]'
    assert StreamDecoder().feed(stream) == [
        b'[2, "2022-01-01_1_subject", null]',
        b'[2, "2022-01-01_1_subject", null]',
        b"[4, null]",
    ]


def test_whitespace_between_messages_dropped() -> None:
    decoder = StreamDecoder()
    assert decoder.feed(b" \r\n\t") == []
    assert decoder.buffered == 0
    assert decoder.feed(b"\n[1]\n\n[2,[3]] \t") == [b"[1]", b"[2,[3]]"]
    assert decoder.feed(b"  [4, ") == []
    assert decoder.buffered == len(b"[4, ")  # leading whitespace is not kept
    assert decoder.feed(b" 5 ]  [") == [b"[4,  5 ]"]
    assert decoder.buffered == 1


def test_brackets_and_quotes_inside_strings() -> None:
    message = b'[64, "]]}{[[", {"k\\"]": "\\\\", "x": ["[", "{"]}]'
    assert json.loads(message)  # it is valid JSON
    decoder = StreamDecoder()
    assert decoder.feed(message + message) == [message, message]


@pytest.mark.parametrize(
    "data",
    [b"x", b"{}", b"1", b'"a"', b"]", b"}", b"null", b" \n x", b"\x00", b"\xef\xbb\xbf[1]"],
)
def test_byte_that_cannot_start_a_message(data: bytes) -> None:
    decoder = StreamDecoder()
    with pytest.raises(FramingError, match="cannot start a message"):
        decoder.feed(data)
    assert decoder.buffered == 0


def test_bad_start_after_a_message() -> None:
    decoder = StreamDecoder()
    assert decoder.feed(b"[1]") == [b"[1]"]
    with pytest.raises(FramingError, match=r"byte b'x' cannot start a message"):
        decoder.feed(b" x")
    decoder = StreamDecoder()
    assert decoder.feed(b"[1") == []
    with pytest.raises(FramingError, match="cannot start a message"):
        decoder.feed(b"] {}")


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (b"[1}", r"unbalanced '\}' at byte 2"),
        (b"[1, {]", r"unbalanced '\]' at byte 5"),
        (b"[[1}]", r"unbalanced '\}' at byte 3"),
        (b'[{"a": 1]}', r"unbalanced '\]'"),
        (b"[[1]]]", "cannot start a message"),
        (b"]", "cannot start a message"),
    ],
)
def test_unbalanced_brackets(data: bytes, pattern: str) -> None:
    with pytest.raises(FramingError, match=pattern):
        StreamDecoder().feed(data)
    # also when the bytes arrive one at a time
    with pytest.raises(FramingError, match=pattern):
        feed_all(StreamDecoder(), one_byte_chunks(data))


@pytest.mark.parametrize(
    "message",
    [
        b'[1, "a\\\\"]',  # string a\ : the backslash is escaped
        b'[1, "a\\"]"]',  # string a"] : the quote is escaped
        b'[1, "\\\\\\""]',  # string \" : escaped backslash then escaped quote
        b'[1, "\\u005d\\\\", "]"]',
    ],
)
def test_escapes_at_every_chunk_boundary(message: bytes) -> None:
    json.loads(message)  # valid JSON
    for i in range(len(message) + 1):
        decoder = StreamDecoder()
        assert feed_all(decoder, [message[:i], message[i:], message]) == [message, message]
        assert decoder.buffered == 0


def test_escaped_backslash_split_after_backslash() -> None:
    message = b'[1, "a\\\\"]'
    cut = message.index(b"\\") + 1
    decoder = StreamDecoder()
    assert decoder.feed(message[:cut]) == []
    assert decoder.buffered == cut
    assert decoder.feed(message[cut:]) == [message]


@pytest.mark.parametrize("text", ["\u00e9", "\u20ac[", "\U0001f600]", '"\u00e9\\"\U0001f600'])
def test_utf8_split_across_reads(text: str) -> None:
    message = json.dumps([1, text, {text: [text]}], ensure_ascii=False).encode()
    assert len(message) > len(json.dumps([1, text, {text: [text]}], ensure_ascii=False))
    for i in range(len(message) + 1):
        decoder = StreamDecoder()
        out = feed_all(decoder, [message[:i], message[i:]])
        assert out == [message]
        assert json.loads(out[0]) == [1, text, {text: [text]}]


def test_eof_on_truncated_message() -> None:
    decoder = StreamDecoder()
    assert decoder.feed(b'[1, "abc') == []
    with pytest.raises(FramingError, match=r"stream ended inside a message \(8 bytes"):
        decoder.eof()
    assert decoder.buffered == 0
    with pytest.raises(FramingError, match="stream ended inside a message"):
        decoder.feed(b'"]')


def test_eof_between_messages() -> None:
    decoder = StreamDecoder()
    assert decoder.feed(b"[1]\n") == [b"[1]"]
    decoder.eof()
    decoder.eof()
    StreamDecoder().eof()


def test_decoder_stays_failed() -> None:
    decoder = StreamDecoder()
    assert decoder.feed(b"[1, {") == []
    with pytest.raises(FramingError) as first:
        decoder.feed(b"]")
    assert decoder.buffered == 0
    with pytest.raises(FramingError) as second:
        decoder.feed(b"[1]")
    assert second.value is first.value
    with pytest.raises(FramingError) as third:
        decoder.eof()
    assert third.value is first.value
    with pytest.raises(FramingError):
        decoder.feed(b"")


@pytest.mark.parametrize("size", [1, 0, -1])
def test_max_message_size_too_small(size: int) -> None:
    with pytest.raises(ValueError, match="at least 2 bytes"):
        StreamDecoder(max_message_size=size)


def test_smallest_max_message_size() -> None:
    decoder = StreamDecoder(max_message_size=2)
    assert decoder.feed(b"[] []") == [b"[]", b"[]"]
    with pytest.raises(FramingError, match=r"\(3 > 2 bytes\)"):
        decoder.feed(b"[1]")


def test_partial_message_over_limit_raises_before_it_ends() -> None:
    decoder = StreamDecoder(max_message_size=16)
    assert decoder.feed(b"[" + b"1," * 7) == []  # 15 bytes held
    assert decoder.buffered == 15
    with pytest.raises(FramingError, match=r"\(17 > 16 bytes\)"):
        decoder.feed(b"1,")
    assert decoder.buffered == 0


def test_limit_counts_message_not_surrounding_whitespace() -> None:
    message = b"[1, 2, 3, 4, 5]"
    decoder = StreamDecoder(max_message_size=len(message))
    assert decoder.feed(b"   \n" + message + b"\n  \t" + message + b"  ") == [message, message]


def test_long_message_fed_one_byte_at_a_time() -> None:
    """Linear scan: a 200 KB message fed byte by byte completes quickly.

    A decoder that rescans its buffer on every feed would take minutes here.
    """
    item = {"k[": ['x\\"]{', "\u00e9", [1, 2.5, None]], "z": "}" * 5}
    message = json.dumps([64, 20, [item] * 3600], ensure_ascii=False).encode()
    assert len(message) > 200_000
    decoder = StreamDecoder()
    out: list[bytes] = []
    for i in range(len(message)):
        out += decoder.feed(message[i : i + 1])
        if i == len(message) - 2:
            assert decoder.buffered == len(message) - 1
    assert out == [message]
    assert decoder.buffered == 0


def test_too_long_names_the_first_message_over_the_limit() -> None:
    """Whole messages taken at once are checked in order, as the scanner checks them."""
    decoder = StreamDecoder(max_message_size=4)
    with pytest.raises(FramingError, match=r"\(7 > 4 bytes\)"):
        decoder.feed(b"[1,2,3][" + b"9," * 20 + b"9]")
