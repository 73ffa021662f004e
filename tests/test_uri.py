"""Tests of URI validation and address helpers.

Expected strings equal iblutil 1.20.0's ``validate_uri`` for every input iblutil
handles; port 0 and bracketed IPv6 are trio-rignet extensions. No network is used
beyond resolving ``localhost``; failing resolution is simulated.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

from trio_rignet import LISTEN_PORT, hostname2ip, is_valid_ip, validate_uri
from trio_rignet._uri import SCHEMES, Endpoint, canonical_address, canonical_host, split_uri


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every name lookup fail, recording the names looked up."""
    looked_up: list[str] = []

    def fail(name: str) -> str:
        looked_up.append(name)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "gethostbyname", fail)
    return looked_up


class TestValidateUri:
    @pytest.mark.parametrize(
        ("uri", "expected"),
        [
            ("ws://127.0.0.1", "ws://127.0.0.1:11001"),
            ("udp://127.0.0.1", "udp://127.0.0.1:11001"),
            ("udp://127.0.0.1:9999", "udp://127.0.0.1:9999"),
            ("127.0.0.1", "udp://127.0.0.1:11001"),
            ("127.0.0.1:80", "udp://127.0.0.1:80"),
            ("192.168.0.4:65535", "udp://192.168.0.4:65535"),
            ("10.0.0.1:1", "udp://10.0.0.1:1"),
            ("localhost", "udp://127.0.0.1:11001"),
            ("localhost:5000", "udp://127.0.0.1:5000"),
            ("ws://localhost:5000", "ws://127.0.0.1:5000"),
            ("127.0.0.1:", "udp://127.0.0.1:11001"),
            (ipaddress.IPv4Address("10.0.0.1"), "udp://10.0.0.1:11001"),
        ],
    )
    def test_matches_iblutil(self, uri: Any, expected: str) -> None:
        assert validate_uri(uri) == expected

    def test_default_port_and_proc(self) -> None:
        assert validate_uri("127.0.0.1", default_port=9000) == "udp://127.0.0.1:9000"
        assert validate_uri("127.0.0.1", default_port="9001") == "udp://127.0.0.1:9001"
        assert validate_uri("127.0.0.1", default_proc="ws") == "ws://127.0.0.1:11001"
        assert (
            validate_uri("127.0.0.1", default_port=1234, default_proc="tcp")
            == "tcp://127.0.0.1:1234"
        )
        # an explicit port and scheme win over the defaults
        assert (
            validate_uri("udp://127.0.0.1:80", default_port=9000, default_proc="ws")
            == "udp://127.0.0.1:80"
        )
        assert (
            validate_uri(ipaddress.IPv4Address("10.0.0.1"), default_port=5, default_proc="ws")
            == "ws://10.0.0.1:5"
        )

    def test_default_port_is_listen_port(self) -> None:
        assert validate_uri("10.1.2.3") == f"udp://10.1.2.3:{LISTEN_PORT}"

    @pytest.mark.parametrize("default_port", [70000, -5, "abc"])
    def test_invalid_default_port(self, default_port: Any) -> None:
        with pytest.raises(ValueError, match="Invalid port number"):
            validate_uri("127.0.0.1", default_port=default_port)

    def test_invalid_default_proc(self) -> None:
        with pytest.raises(ValueError, match="Unsupported scheme 'http'"):
            validate_uri("127.0.0.1", default_proc="http")

    def test_no_resolve_keeps_hostname(self, no_dns: list[str]) -> None:
        assert validate_uri("my-rig", resolve_host=False) == "udp://my-rig:11001"
        assert validate_uri("ws://rig-02:8000", resolve_host=False) == "ws://rig-02:8000"
        # IP addresses are still accepted (and normalised) without resolution
        assert validate_uri("127.0.0.1:80", resolve_host=False) == "udp://127.0.0.1:80"
        assert validate_uri("[::1]", resolve_host=False) == "udp://[::1]:11001"
        assert no_dns == []

    @pytest.mark.parametrize("host", ["My.Rig", "My-Rig", "rig.lan", "rig_1", "rig 1"])
    def test_no_resolve_rejects_invalid_hostname(self, host: str, no_dns: list[str]) -> None:
        with pytest.raises(ValueError, match="Invalid hostname") as info:
            validate_uri(host, resolve_host=False)
        assert host in str(info.value)
        assert no_dns == []

    def test_unresolvable_host(self, no_dns: list[str]) -> None:
        with pytest.raises(ValueError, match='Failed to resolve IP for hostname "no-such-rig"'):
            validate_uri("udp://no-such-rig:11001")
        assert no_dns == ["no-such-rig"]

    def test_unencodable_host(self) -> None:
        # A label over 63 characters fails IDNA encoding locally (UnicodeError),
        # before any network lookup.
        host = "a" * 64 + ".example"
        with pytest.raises(ValueError, match="Failed to resolve IP"):
            validate_uri(host)

    @pytest.mark.parametrize(
        "uri",
        [
            "127.0.0.1:65536",
            "127.0.0.1:-1",
            "127.0.0.1:abc",
            "udp://127.0.0.1:99999",
            "127.0.0.1:1.5",
            "[::1]:65536",
            "[::1]:x",
        ],
    )
    def test_invalid_port(self, uri: str) -> None:
        with pytest.raises(ValueError, match="Invalid port number"):
            validate_uri(uri)

    def test_port_zero_accepted(self) -> None:
        assert validate_uri("127.0.0.1:0") == "udp://127.0.0.1:0"
        assert validate_uri("ws://127.0.0.1:0") == "ws://127.0.0.1:0"
        assert validate_uri("127.0.0.1", default_port=0) == "udp://127.0.0.1:0"
        assert validate_uri("[::1]:0") == "udp://[::1]:0"

    @pytest.mark.parametrize(
        ("uri", "expected"),
        [
            ("udp://[::1]:11001", "udp://[::1]:11001"),
            ("[::1]", "udp://[::1]:11001"),
            ("[::1]:9000", "udp://[::1]:9000"),
            ("::1", "udp://[::1]:11001"),
            ("ws://[::1]", "ws://[::1]:11001"),
            ("ws://::1", "ws://[::1]:11001"),
            ("[0:0:0:0:0:0:0:1]:5", "udp://[::1]:5"),
            ("fe80::1", "udp://[fe80::1]:11001"),
            (ipaddress.IPv6Address("::1"), "udp://[::1]:11001"),
        ],
    )
    def test_ipv6(self, uri: Any, expected: str) -> None:
        assert validate_uri(uri) == expected

    @pytest.mark.parametrize("uri", ["[::1", "udp://[::1", "[::1]9000", "[::1]x:80"])
    def test_ipv6_malformed(self, uri: str) -> None:
        with pytest.raises(ValueError, match="Invalid address"):
            validate_uri(uri)

    @pytest.mark.parametrize("scheme", ["udp", "ws", "tcp", "wss", "UDP", "Ws", "TCP", "wsS"])
    def test_schemes(self, scheme: str) -> None:
        assert validate_uri(f"{scheme}://127.0.0.1:80") == f"{scheme.lower()}://127.0.0.1:80"

    def test_scheme_list(self) -> None:
        assert SCHEMES == ("udp", "ws", "wss", "tcp")

    @pytest.mark.parametrize("uri", ["http://x", "https://127.0.0.1:80", "file://localhost"])
    def test_unsupported_scheme(self, uri: str, no_dns: list[str]) -> None:
        with pytest.raises(ValueError, match="Unsupported scheme") as info:
            validate_uri(uri)
        message = str(info.value)
        for scheme in ("udp://", "ws://", "wss://", "tcp://"):
            assert scheme in message
        assert no_dns == []  # rejected before any lookup

    @pytest.mark.parametrize("uri", [2130706433, None, b"udp://127.0.0.1:80", 1.5, ["127.0.0.1"]])
    def test_type_error(self, uri: Any) -> None:
        with pytest.raises(TypeError, match="Unsupported URI"):
            validate_uri(uri)

    @pytest.mark.parametrize(
        "uri", ["ws://127.0.0.1", "127.0.0.1:0", "[::1]:80", "tcp://10.0.0.1:65535"]
    )
    def test_idempotent(self, uri: str) -> None:
        once = validate_uri(uri)
        assert validate_uri(once) == once


class TestSplitUri:
    def test_split(self) -> None:
        assert split_uri("udp://127.0.0.1:80") == Endpoint("udp", "127.0.0.1", 80)
        assert split_uri("ws://[::1]:0") == Endpoint("ws", "::1", 0)
        assert split_uri("udp://127.0.0.1:80").transport == "udp"
        assert [split_uri(f"{s}://h:1").transport for s in ("ws", "wss", "tcp")] == ["tcp"] * 3

    def test_canonical_host(self) -> None:
        assert canonical_host("0:0:0:0:0:0:0:1") == "::1"
        assert canonical_host("127.0.0.1") == "127.0.0.1"
        assert canonical_host("FE80::1%eth0") == "fe80::1%eth0"
        assert canonical_host("not an address") == "not an address"

    @pytest.mark.parametrize("mapped", ["::ffff:127.0.0.1", "::ffff:7f00:1", "::FFFF:7F00:0001"])
    def test_ipv4_mapped_is_ipv4(self, mapped: str) -> None:
        """However a Python version spells an IPv4-mapped address, it is the IPv4 peer."""
        assert canonical_host(mapped) == "127.0.0.1"
        assert canonical_address((mapped, 9, 0, 0)) == ("127.0.0.1", 9)


class TestIpHelpers:
    @pytest.mark.parametrize(
        "value",
        [
            "127.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "fe80::1",
            "2001:db8::8a2e:370:7334",
            ipaddress.IPv4Address("10.0.0.1"),
            ipaddress.IPv6Address("::1"),
            2130706433,
        ],
    )
    def test_is_valid_ip_true(self, value: Any) -> None:
        assert is_valid_ip(value) is True

    @pytest.mark.parametrize(
        "value",
        ["", "localhost", "256.0.0.1", "1.2.3", "127.0.0.1:80", "[::1]", ":::1", "my-rig", -1],
    )
    def test_is_valid_ip_false(self, value: Any) -> None:
        assert is_valid_ip(value) is False

    def test_hostname2ip_localhost(self) -> None:
        result = hostname2ip("localhost")
        assert result == ipaddress.IPv4Address("127.0.0.1")
        assert isinstance(result, ipaddress.IPv4Address)

    def test_hostname2ip_ip_text(self) -> None:
        assert hostname2ip("10.0.0.1") == ipaddress.IPv4Address("10.0.0.1")

    def test_hostname2ip_default_is_this_computer(self, monkeypatch: pytest.MonkeyPatch) -> None:
        looked_up: list[str] = []

        def fake(name: str) -> str:
            looked_up.append(name)
            return "192.0.2.7"

        monkeypatch.setattr(socket, "gethostname", lambda: "this-rig")
        monkeypatch.setattr(socket, "gethostbyname", fake)
        assert hostname2ip() == ipaddress.IPv4Address("192.0.2.7")
        assert hostname2ip("") == ipaddress.IPv4Address("192.0.2.7")
        assert looked_up == ["this-rig", "this-rig"]

    def test_hostname2ip_failure(self, no_dns: list[str]) -> None:
        with pytest.raises(ValueError, match='Failed to resolve IP for hostname "nowhere"'):
            hostname2ip("nowhere")
        assert no_dns == ["nowhere"]
