"""Tests of the pure message layer: event codes, builders, encode/decode, parser.

The byte vectors in ``TestBuilders`` were produced by iblutil 1.20.0 itself, so
they pin wire compatibility.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import trio_rignet
from trio_rignet import (
    LISTEN_PORT,
    PROTOCOL_VERSION,
    ExpMessage,
    ExpStatus,
    Message,
    MessageError,
    RignetError,
    decode,
    encode,
    format_exp_ref,
    parse_message,
)
from trio_rignet._messages import (
    build_alyx,
    build_cleanup,
    build_error,
    build_event,
    build_info,
    build_init,
    build_start,
    build_status,
    build_stop,
    event_bits,
    loads,
)

SINGLE_EVENTS = [
    ExpMessage.EXPINIT,
    ExpMessage.EXPSTART,
    ExpMessage.EXPEND,
    ExpMessage.EXPCLEANUP,
    ExpMessage.EXPINTERRUPT,
    ExpMessage.EXPSTATUS,
    ExpMessage.EXPINFO,
    ExpMessage.ALYX,
]


# --------------------------------------------------------------------------- constants


class TestConstants:
    def test_exp_message_values(self) -> None:
        assert {m.name: int(m) for m in ExpMessage} == {
            "EXPINIT": 1,
            "EXPSTART": 2,
            "EXPEND": 4,
            "EXPCLEANUP": 8,
            "EXPINTERRUPT": 16,
            "EXPSTATUS": 32,
            "EXPINFO": 64,
            "ALYX": 128,
        }
        assert list(ExpMessage) == SINGLE_EVENTS

    def test_exp_status_values(self) -> None:
        assert {s.name: int(s) for s in ExpStatus} == {
            "CONNECTED": 0,
            "INITIALIZED": 10,
            "RUNNING": 20,
            "STOPPED": 30,
        }

    def test_protocol_constants(self) -> None:
        assert PROTOCOL_VERSION == "1.0.0"
        assert LISTEN_PORT == 11001

    def test_any(self) -> None:
        combined = ExpMessage.any()
        assert isinstance(combined, ExpMessage)
        assert combined == 255
        assert all(m in combined for m in SINGLE_EVENTS)
        assert list(event_bits(combined)) == SINGLE_EVENTS

    def test_event_bits(self) -> None:
        assert list(event_bits(ExpMessage(0))) == []
        assert list(event_bits(ExpMessage.EXPINIT | ExpMessage.ALYX)) == [
            ExpMessage.EXPINIT,
            ExpMessage.ALYX,
        ]

    def test_public_exports(self) -> None:
        assert trio_rignet.parse_message is parse_message
        assert trio_rignet.MessageError is MessageError
        assert issubclass(MessageError, ValueError)
        assert issubclass(MessageError, RignetError)


# --------------------------------------------------------------------------- ExpMessage.validate


class TestExpMessageValidate:
    @pytest.mark.parametrize(
        ("event", "expected"),
        [
            ("EXPSTART", ExpMessage.EXPSTART),
            ("expstart", ExpMessage.EXPSTART),
            (" expstart ", ExpMessage.EXPSTART),
            ("\tExpEnd\n", ExpMessage.EXPEND),
            ("start", ExpMessage.EXPSTART),
            (" Init ", ExpMessage.EXPINIT),
            ("interrupt", ExpMessage.EXPINTERRUPT),
            (" Stop ", ExpMessage.EXPEND),
            ("cleanup", ExpMessage.EXPCLEANUP),
            ("status", ExpMessage.EXPSTATUS),
            ("info", ExpMessage.EXPINFO),
            ("alyx", ExpMessage.ALYX),
            ("ALYX", ExpMessage.ALYX),
            (1, ExpMessage.EXPINIT),
            (4, ExpMessage.EXPEND),
            (128, ExpMessage.ALYX),
            (ExpMessage.EXPINFO, ExpMessage.EXPINFO),
        ],
    )
    def test_single(self, event: Any, expected: ExpMessage) -> None:
        result = ExpMessage.validate(event)
        assert result is expected
        assert ExpMessage.validate(event, allow_bitwise=False) is expected

    @pytest.mark.parametrize("event", SINGLE_EVENTS)
    def test_every_member_by_name_int_and_member(self, event: ExpMessage) -> None:
        assert event.name is not None
        assert ExpMessage.validate(event.name.lower()) is event
        assert ExpMessage.validate(int(event)) is event
        assert ExpMessage.validate(event) is event

    def test_compound_allowed_by_default(self) -> None:
        three = ExpMessage.validate(3)
        assert isinstance(three, ExpMessage)
        assert three == ExpMessage.EXPINIT | ExpMessage.EXPSTART
        both = ExpMessage.validate(ExpMessage.EXPINIT | ExpMessage.EXPEND)
        assert both == 5
        assert ExpMessage.validate(255) == ExpMessage.any()

    @pytest.mark.parametrize("event", [3, 255, ExpMessage.EXPINIT | ExpMessage.EXPEND])
    def test_compound_rejected(self, event: Any) -> None:
        with pytest.raises(ValueError, match="Compound") as info:
            ExpMessage.validate(event, allow_bitwise=False)
        assert "EXPINIT" in str(info.value)

    @pytest.mark.parametrize("event", [1.0, None, True, False, [1], b"EXPINIT", {"a": 1}])
    def test_type_error(self, event: Any) -> None:
        with pytest.raises(TypeError, match="event must be"):
            ExpMessage.validate(event)

    @pytest.mark.parametrize("event", ["EXPFOO", "", "  ", "exp", "expexpstart", "EXP_START"])
    def test_unknown_name(self, event: str) -> None:
        with pytest.raises(ValueError, match="Unrecognized event") as info:
            ExpMessage.validate(event)
        message = str(info.value)
        assert all(name in message for name in ExpMessage.__members__)

    @pytest.mark.parametrize("event", [256, -1, 257, 1 << 40])
    def test_unknown_code(self, event: int) -> None:
        with pytest.raises(ValueError, match="Unrecognized event code") as info:
            ExpMessage.validate(event)
        assert "(1, 2, 4, 8, 16, 32, 64, 128)" in str(info.value)

    @given(st.integers(1, 255))
    def test_every_in_range_code_accepted(self, code: int) -> None:
        event = ExpMessage.validate(code)
        assert int(event) == code
        single = code & (code - 1) == 0
        if single:
            assert ExpMessage.validate(code, allow_bitwise=False) == code
        else:
            with pytest.raises(ValueError, match="Compound"):
                ExpMessage.validate(code, allow_bitwise=False)


# --------------------------------------------------------------------------- ExpStatus.validate


class TestExpStatusValidate:
    @pytest.mark.parametrize(
        ("status", "expected"),
        [
            ("RUNNING", ExpStatus.RUNNING),
            (" running ", ExpStatus.RUNNING),
            ("Connected", ExpStatus.CONNECTED),
            ("stopped\n", ExpStatus.STOPPED),
            (0, ExpStatus.CONNECTED),
            (10, ExpStatus.INITIALIZED),
            (30, ExpStatus.STOPPED),
            (ExpStatus.INITIALIZED, ExpStatus.INITIALIZED),
        ],
    )
    def test_valid(self, status: Any, expected: ExpStatus) -> None:
        assert ExpStatus.validate(status) is expected

    @pytest.mark.parametrize("status", [1.0, None, True, [20], b"RUNNING"])
    def test_type_error(self, status: Any) -> None:
        with pytest.raises(TypeError, match="status must be"):
            ExpStatus.validate(status)

    @pytest.mark.parametrize("status", ["WALKING", "", 5, -10, 40, 21])
    def test_value_error_lists_choices(self, status: Any) -> None:
        with pytest.raises(ValueError, match="Unrecognized status") as info:
            ExpStatus.validate(status)
        assert "CONNECTED=0, INITIALIZED=10, RUNNING=20, STOPPED=30" in str(info.value)


# --------------------------------------------------------------------------- builders


@dataclass
class FakeAlyx:
    base_url: str
    user: str
    _token: Any
    is_logged_in: bool


class TestBuilders:
    """Exact bytes, as sent by iblutil 1.20.0 for the same calls."""

    def test_init(self) -> None:
        assert build_init() == b"[1, null]"
        assert build_init({"\u00e9": [1, {"a": None}]}) == b'[1, {"\\u00e9": [1, {"a": null}]}]'

    def test_start(self) -> None:
        assert build_start("2022-01-01_1_subject") == b'[2, "2022-01-01_1_subject", null]'
        ref = {"date": "2022-01-01", "sequence": "001", "subject": "s"}
        assert build_start(ref, [1]) == b'[2, "2022-01-01_1_s", [1]]'
        assert build_start("") == b"[2, null, null]"
        assert build_start(None) == b"[2, null, null]"

    def test_stop(self) -> None:
        assert build_stop() == b"[4, null]"
        assert build_stop("x") == b'[4, "x"]'
        assert build_stop("x", immediately=True) == b'[16, "x"]'

    def test_cleanup(self) -> None:
        assert build_cleanup(3) == b"[8, 3]"
        assert build_cleanup() == b"[8, null]"

    def test_status(self) -> None:
        assert build_status("RUNNING") == b"[32, 20]"
        assert build_status(10) == b"[32, 10]"
        assert build_status(ExpStatus.CONNECTED) == b"[32, 0]"

    @pytest.mark.parametrize(("status", "exc"), [("nope", ValueError), (1.5, TypeError)])
    def test_status_invalid(self, status: Any, exc: type[Exception]) -> None:
        with pytest.raises(exc):
            build_status(status)
        with pytest.raises(exc):
            build_info(status)

    def test_info(self) -> None:
        assert build_info(ExpStatus.STOPPED, {"k": "v"}) == b'[64, 30, {"k": "v"}]'
        assert build_info("initialized") == b"[64, 10, null]"

    def test_alyx(self) -> None:
        logged_in = FakeAlyx("https://alyx.example.org", "u", "tok", is_logged_in=True)
        assert build_alyx(logged_in) == b'[128, "https://alyx.example.org", {"u": "tok"}]'
        logged_out = FakeAlyx("https://alyx.example.org", "u", "tok", is_logged_in=False)
        assert build_alyx(logged_out) == b'[128, "https://alyx.example.org", {}]'
        assert build_alyx(None) == b"[128, null, {}]"
        assert build_alyx() == b"[128, null, {}]"

    def test_error(self) -> None:
        assert build_error(ValueError("x"), ExpMessage.EXPINIT) == b'[0, "ValueError: x", 1]'
        assert build_error("KeyError: 'k'", 4) == b"[0, \"KeyError: 'k'\", 4]"

    def test_event(self) -> None:
        assert build_event(ExpMessage.EXPINFO, 20, None) == b"[64, 20, null]"
        assert build_event(ExpMessage.EXPEND) == b"[4]"


# --------------------------------------------------------------------------- format_exp_ref


class TestFormatExpRef:
    def test_string_and_empty(self) -> None:
        assert format_exp_ref("2022-01-01_1_subject") == "2022-01-01_1_subject"
        assert format_exp_ref("") is None
        assert format_exp_ref(None) is None

    @pytest.mark.parametrize(
        ("ref", "expected"),
        [
            ({"date": "2022-01-01", "sequence": "001", "subject": "s"}, "2022-01-01_1_s"),
            ({"date": "2022-01-01", "sequence": 12, "subject": "mouse"}, "2022-01-01_12_mouse"),
            ({"subject": "s", "sequence": 3, "date": "d", "extra": 1}, "d_3_s"),
        ],
    )
    def test_mapping(self, ref: dict[str, Any], expected: str) -> None:
        assert format_exp_ref(ref) == expected

    @pytest.mark.parametrize("missing", ["date", "sequence", "subject"])
    def test_missing_key(self, missing: str) -> None:
        ref = {"date": "2022-01-01", "sequence": 1, "subject": "s"}
        del ref[missing]
        with pytest.raises(ValueError, match=f"missing '{missing}'"):
            format_exp_ref(ref)

    @pytest.mark.parametrize("sequence", ["abc", None, "1.5", [1]])
    def test_sequence_not_int(self, sequence: Any) -> None:
        ref = {"date": "2022-01-01", "sequence": sequence, "subject": "s"}
        with pytest.raises(ValueError, match="sequence must be an integer"):
            format_exp_ref(ref)
        with pytest.raises(ValueError, match="sequence must be an integer"):
            build_start(ref)

    @pytest.mark.parametrize("ref", [123, ["2022-01-01", 1, "s"], b"2022-01-01_1_s"])
    def test_wrong_type(self, ref: Any) -> None:
        with pytest.raises(TypeError, match="exp_ref must be"):
            format_exp_ref(ref)


# --------------------------------------------------------------------------- encode / decode


class TestEncodeDecode:
    def test_bytes_pass_through(self) -> None:
        raw = b"\xff not json ["
        assert encode(raw) is raw
        result = encode(bytearray(b"[1]"))
        assert type(result) is bytes
        assert result == b"[1]"

    def test_str_utf8_as_is(self) -> None:
        assert encode("[1, null]") == b"[1, null]"
        assert encode("\u00e9") == b"\xc3\xa9"

    def test_json_default_separators(self) -> None:
        assert encode([1, {"a": 2, "b": [None, True]}]) == b'[1, {"a": 2, "b": [null, true]}]'
        assert encode(["\u00e9"]) == b'["\\u00e9"]'
        assert encode(None) == b"null"
        assert encode(3) == b"3"
        assert encode([ExpMessage.ALYX, ExpStatus.RUNNING]) == b"[128, 20]"

    def test_decode_json(self) -> None:
        assert decode(b'[1, {"a": null}]') == [1, {"a": None}]
        assert decode(b'"\\u00e9"') == "\u00e9"
        assert decode("[2]".encode("utf-16")) == [2]  # json.loads detects the encoding

    def test_decode_not_json_returns_text(self) -> None:
        assert decode(b"hello") == "hello"
        assert decode(b"[1, ") == "[1, "
        assert decode(b"\xff[") == "\ufffd["
        assert decode(b"") == ""

    def test_decode_deeply_nested_returns_text(self) -> None:
        # json.loads raises RecursionError here; decode must still return text.
        raw = b"[" * 100_000 + b"]" * 100_000
        assert decode(raw) == raw.decode()

    @given(st.binary(max_size=64))
    def test_decode_never_raises(self, raw: bytes) -> None:
        result = decode(raw)
        try:
            expected = json.loads(raw)
        except ValueError:
            expected = raw.decode(errors="replace")
        assert result == expected or (result != result and expected != expected)


# --------------------------------------------------------------------------- parse_message

ADDR = ("192.168.0.4", 11001)


class TestParseMessage:
    @pytest.mark.parametrize(
        ("raw", "event", "data"),
        [
            (build_init(), ExpMessage.EXPINIT, [None]),
            (build_init({"a": [1, 2]}), ExpMessage.EXPINIT, [{"a": [1, 2]}]),
            (
                build_start("2022-01-01_1_subject", {"k": 1}),
                ExpMessage.EXPSTART,
                ["2022-01-01_1_subject", {"k": 1}],
            ),
            (build_start(None), ExpMessage.EXPSTART, [None, None]),
            (build_stop("x"), ExpMessage.EXPEND, ["x"]),
            (build_stop(immediately=True), ExpMessage.EXPINTERRUPT, [None]),
            (build_cleanup(3), ExpMessage.EXPCLEANUP, [3]),
            (build_status("RUNNING"), ExpMessage.EXPSTATUS, [20]),
            (build_info(30, {"k": "v"}), ExpMessage.EXPINFO, [30, {"k": "v"}]),
            (
                build_alyx(FakeAlyx("https://a.org", "u", "t", is_logged_in=True)),
                ExpMessage.ALYX,
                ["https://a.org", {"u": "t"}],
            ),
            (build_alyx(None), ExpMessage.ALYX, [None, {}]),
            (b'[1, "\\u00e9"]', ExpMessage.EXPINIT, ["\u00e9"]),
            ('[1, "\u00e9"]'.encode(), ExpMessage.EXPINIT, ["\u00e9"]),
            (b"[4]", ExpMessage.EXPEND, []),
            (b' \n[64,20,null,"extra"] ', ExpMessage.EXPINFO, [20, None, "extra"]),
        ],
    )
    def test_valid(self, raw: bytes, event: ExpMessage, data: list[Any]) -> None:
        message = parse_message(raw, ADDR)
        assert message == Message(event, data, ADDR)
        assert message.event is event
        assert message.addr == ADDR
        assert not message.is_error

    @pytest.mark.parametrize("event", SINGLE_EVENTS)
    def test_every_event_code(self, event: ExpMessage) -> None:
        message = parse_message(build_event(event, "d"))
        assert message == Message(event, ["d"], None)
        assert message.addr is None

    def test_error_report(self) -> None:
        message = parse_message(b'[0, "T: x", 1]', ADDR)
        assert message == Message(ExpMessage(0), ["T: x", 1], ADDR)
        assert message.is_error
        assert int(message.event) == 0
        built = parse_message(build_error(ValueError("bad"), ExpMessage.EXPSTART))
        assert built.data == ["ValueError: bad", 2]
        assert built.is_error

    def test_message_is_frozen_and_compares_addr(self) -> None:
        message = parse_message(b"[1, null]", ADDR)
        assert message != parse_message(b"[1, null]", ("10.0.0.1", 11001))
        with pytest.raises(AttributeError):
            message.event = ExpMessage.EXPEND  # type: ignore[misc]

    @pytest.mark.parametrize(
        "raw",
        [
            pytest.param(b"\xff\xfe", id="invalid-utf8"),
            pytest.param(b'[1, "\xc3"]', id="truncated-utf8"),
            pytest.param(b"", id="empty"),
            pytest.param(b"not json", id="not-json"),
            pytest.param(b"[1, null", id="unterminated"),
            pytest.param(b"[1][2]", id="two-messages"),
            pytest.param(b'{"a": 1}', id="object"),
            pytest.param(b"1", id="number"),
            pytest.param(b'"x"', id="string"),
            pytest.param(b"null", id="null"),
            pytest.param(b"[]", id="empty-list"),
            pytest.param(b"[256, null]", id="unknown-code-256"),
            pytest.param(b"[-1, null]", id="negative-code"),
            pytest.param(b"[3, null]", id="compound-code-3"),
            pytest.param(b"[255]", id="compound-code-255"),
            pytest.param(b'["1", null]', id="code-as-string"),
            pytest.param(b'["EXPINIT", null]', id="code-as-name"),
            pytest.param(b"[1.0, null]", id="code-as-float"),
            pytest.param(b"[true, null]", id="code-as-true"),
            pytest.param(b"[false, null]", id="code-as-false"),
            pytest.param(b"[[1], null]", id="code-as-list"),
            pytest.param(b"[null]", id="code-as-null"),
            pytest.param(b"[NaN]", id="code-as-nan"),
            pytest.param(b"[0]", id="error-too-short"),
            pytest.param(b'[0, "T: x"]', id="error-no-event"),
            pytest.param(b'[0, "T: x", 1, 2]', id="error-too-long"),
            pytest.param(b"[0, 5, 1]", id="error-text-not-str"),
            pytest.param(b'[0, "T: x", "1"]', id="error-event-str"),
            pytest.param(b'[0, "T: x", true]', id="error-event-bool"),
            pytest.param(b'[0, "T: x", 1.0]', id="error-event-float"),
            pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeply-nested"),
        ],
    )
    def test_invalid(self, raw: bytes) -> None:
        with pytest.raises(MessageError) as info:
            parse_message(raw, ADDR)
        assert isinstance(info.value, ValueError)

    def test_error_messages_say_what_is_wrong(self) -> None:
        with pytest.raises(MessageError, match="not a UTF-8 JSON message"):
            parse_message(b"\xff")
        with pytest.raises(MessageError, match="must be a JSON array, got dict"):
            parse_message(b"{}")
        with pytest.raises(MessageError, match="empty array"):
            parse_message(b"[]")
        with pytest.raises(MessageError, match="unknown or compound event code 3"):
            parse_message(b"[3]")
        with pytest.raises(MessageError, match="an error report must be"):
            parse_message(b"[0]")

    @given(st.binary(max_size=200))
    def test_arbitrary_bytes_give_message_or_message_error(self, raw: bytes) -> None:
        try:
            message = parse_message(raw)
        except MessageError:
            return
        assert isinstance(message, Message)
        assert message.event == 0 or message.event in SINGLE_EVENTS

    @given(
        st.lists(
            st.sampled_from([b"[", b"]", b"0", b"1", b"3", b", ", b'"T: x"', b"null", b"{}"]),
            max_size=12,
        ).map(b"".join)
    )
    def test_near_valid_bytes_give_message_or_message_error(self, raw: bytes) -> None:
        try:
            message = parse_message(raw)
        except MessageError:
            return
        obj = json.loads(raw)
        assert message == Message(ExpMessage(obj[0]), obj[1:], None)

    @given(
        st.sampled_from(SINGLE_EVENTS),
        st.lists(
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(),
                lambda inner: (
                    st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3)
                ),
                max_leaves=8,
            ),
            max_size=4,
        ),
    )
    def test_round_trip(self, event: ExpMessage, data: list[Any]) -> None:
        message = parse_message(build_event(event, *data), ADDR)
        assert message == Message(event, data, ADDR)


_json_text = st.one_of(
    st.text(max_size=40),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=8,
    ).map(json.dumps),
)


@given(_json_text, st.sampled_from(["", " ", "\n", "\t ", "x", "[1]", "]"]))
def test_the_fast_json_parse_is_json_loads(text: str, suffix: str) -> None:
    """parse_message's JSON step returns what json.loads returns, or raises the same error."""
    for candidate in (text, text + suffix, suffix + text):
        try:
            expected: Any = ("value", json.loads(candidate))
        except (ValueError, RecursionError) as exc:
            expected = ("error", type(exc), str(exc))
        try:
            got: Any = ("value", loads(candidate))
        except (ValueError, RecursionError) as exc:
            got = ("error", type(exc), str(exc))
        assert repr(got) == repr(expected)
