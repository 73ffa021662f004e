"""The tag codec (``_tag.py``): properties over generated messages and fields.

Invariants: a tag round-trips its fields; a tagged message is the same JSON
as the untagged one (so any JSON reader, iblutil included, sees the same
message); stripping the tag restores the exact bytes; bytes without a tag
(iblutil's messages, random whitespace) never read as tagged.
"""

from __future__ import annotations

import json

from hypothesis import assume, given
from hypothesis import strategies as st

from trio_rignet._tag import Tagger, read_tag, strip_tag

u32 = st.integers(min_value=0, max_value=2**32 - 1)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)
messages = st.lists(json_values, min_size=1, max_size=5).map(lambda v: json.dumps(v).encode())


@given(messages, u32, u32, st.none() | u32)
def test_tag_round_trips_and_is_invisible_to_json(
    message: bytes, session: int, seq: int, ref: int | None
) -> None:
    tagged = Tagger(session).tag(message, seq, ref)
    assert read_tag(tagged) == (session, seq, ref)
    assert json.loads(tagged) == json.loads(message)
    assert strip_tag(tagged) == message
    assert tagged.startswith(message[:-1])
    assert tagged.endswith(b"]")


@given(messages)
def test_untagged_messages_have_no_tag(message: bytes) -> None:
    """``json.dumps`` (what iblutil sends) never produces a tag."""
    assert read_tag(message) is None
    assert strip_tag(message) == message


@given(
    messages, st.binary(min_size=0, max_size=80).map(lambda b: bytes(b" \t\r\n"[x % 4] for x in b))
)
def test_random_whitespace_before_the_bracket_is_rarely_a_tag(message: bytes, ws: bytes) -> None:
    """Whitespace that is not a tag almost never reads as one (a check byte guards it)."""
    candidate = message[:-1] + ws + b"]"
    tag = read_tag(candidate)
    if tag is not None:
        # Only possible if ws happens to hold a well-formed tag with a valid check byte;
        # then stripping it must still give back valid JSON with the same content.
        assert json.loads(strip_tag(candidate)) == json.loads(message)


def test_false_positive_rate_of_random_whitespace_is_tiny() -> None:
    import random

    rng = random.Random(1)
    hits = 0
    tries = 20_000
    for _ in range(tries):
        ws = bytes(rng.choice(b" \t\r\n") for _ in range(41))
        hits += read_tag(b"[1, null" + ws + b"]") is not None
    # A body with a valid marker, header and check byte: about 4**-7 per try.
    assert hits <= 5


@given(messages, u32, u32)
def test_corrupting_a_tag_never_crashes_and_rarely_passes(
    message: bytes, session: int, seq: int
) -> None:
    tagged = bytearray(Tagger(session).tag(message, seq))
    for i in range(len(message) - 1, len(tagged) - 1):
        corrupt = bytes(tagged[:i]) + b"x" + bytes(tagged[i + 1 :])
        assert read_tag(corrupt) is None


@given(u32, u32, u32)
def test_tags_of_two_messages_differ_by_seq(session: int, a: int, b: int) -> None:
    assume(a != b)
    tagger = Tagger(session)
    assert tagger.tag(b"[1, null]", a) != tagger.tag(b"[1, null]", b)
