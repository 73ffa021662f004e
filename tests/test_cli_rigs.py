"""Rig lists for ``rignet run``: iblrig's ``remote_devices.yaml`` without a YAML library, TOML.

The YAML reader is checked against PyYAML itself: whatever ``yaml.safe_dump``
writes for a mapping of rig names to URIs (which is how iblrig writes the file)
must read back exactly as ``yaml.safe_load`` reads it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_rignet._cli_rigs import (
    RigsError,
    check_uri,
    load_rigs,
    parse_rig_option,
    parse_toml_rigs,
    parse_yaml_rigs,
)

yaml = pytest.importorskip("yaml")

ips = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
ports = st.integers(1, 65535)
hosts = st.one_of(ips, st.sampled_from(["localhost", "rig-pc", "Video-PC.lab.example.org"]))
uris = st.one_of(
    st.builds(
        lambda s, h, p: f"{s}://{h}:{p}", st.sampled_from(["udp", "ws", "tcp"]), hosts, ports
    ),
    st.builds(lambda h, p: f"{h}:{p}", ips, ports),
    ips,
    st.builds(lambda p: f"udp://[::1]:{p}", ports),
)
# Rig names as people write them, with the characters that make YAML quote.
names = st.text(
    alphabet=st.sampled_from(list("abcxyzABC019_-.:# '\"\\éµ")), min_size=1, max_size=24
).filter(lambda s: s == s.strip() and s not in ("-", "?"))


@given(st.dictionaries(names, uris, min_size=1, max_size=6))
def test_reads_what_yaml_safe_dump_writes(rigs: dict[str, str]) -> None:
    text = yaml.safe_dump(rigs)
    assert yaml.safe_load(text) == rigs  # the premise: iblrig reads its file back
    assert parse_yaml_rigs(text) == rigs
    assert list(parse_yaml_rigs(text)) == sorted(rigs)  # safe_dump sorts the keys


@given(st.dictionaries(names, uris, min_size=1, max_size=3))
def test_reads_the_flow_style_of_older_pyyaml(rigs: dict[str, str]) -> None:
    text = yaml.safe_dump(rigs, default_flow_style=True, width=1 << 16)
    assert text.startswith("{")
    assert parse_yaml_rigs(text) == yaml.safe_load(text) == rigs


def test_iblrig_examples() -> None:
    """The file iblrig's net module documents, and one its GUI test writes."""
    documented = """\
neuropixel: '12.134.27.1'
'cameras:left': 'tcp://0.123.45.7:9998'
'cameras:right': 'tcp://0.123.45.6:9998'
tasks: 'udp://123.65.8.8'
"""
    assert parse_yaml_rigs(documented) == yaml.safe_load(documented)
    gui = yaml.dump({"cameras": "192.168.0.1", "mesoscope": "ws://86.167.0.224:8888"})
    assert parse_yaml_rigs(gui) == {"cameras": "192.168.0.1", "mesoscope": "ws://86.167.0.224:8888"}


def test_comments_documents_and_blank_lines() -> None:
    text = """\
# remote devices of rig 3
---
video: udp://10.0.0.2:11001   # the camera PC

ephys: "ws://10.0.0.3:11001"  # quoted, then a comment
rig#4: udp://10.0.0.4
...
# the end
"""
    assert parse_yaml_rigs(text) == yaml.safe_load(text)
    assert parse_yaml_rigs(text)["rig#4"] == "udp://10.0.0.4"  # no space before #: no comment


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("video:\n", "line 1: rig 'video' has no URI; write e.g. `video: udp://"),
        ("video: ~\n", "rig 'video' has no URI"),
        ("video:\n  uri: udp://10.0.0.2\n", "line 1: rig 'video' has no URI"),
        ("rigs:\n  video: udp://x\n", "line 1: rig 'rigs' has no URI"),
        ("  video: udp://10.0.0.2\n", "line 1: indented line: a rig list is flat"),
        ("- video\n", "line 1: a YAML list is not a rig list"),
        ("video: [udp://10.0.0.2]\n", "'[' starts YAML that a rig list does not use"),
        ("video: |\n  udp://x\n", "'|' starts YAML"),
        ("video: 'udp://10.0.0.2\n", "unterminated '...' string"),
        ('video: "udp://\\q"\n', "unknown escape \\q"),
        ("video udp://10.0.0.2\n", "line 1: expected `name: URI`"),
        ("a: udp://10.0.0.2\na: udp://10.0.0.3\n", "line 2: rig 'a' is listed twice (also line 1)"),
        ("a: udp://10.0.0.2\n---\nb: udp://10.0.0.3\n", "line 2: a rigs file holds one YAML"),
        ("a: udp://x: y\n", "unexpected text after the URI of 'a'"),
        ("video: bogus://10.0.0.2\n", "line 1: rig 'video': Unsupported scheme 'bogus'"),
        ("video: udp://10.0.0.2:70000\n", "Invalid port number: 70000"),
        ("{a: udp://10.0.0.2, b\n", "expected `name: URI`"),
        ("? a\n: udp://10.0.0.2\n", "complex `? key` entries"),
    ],
)
def test_yaml_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(RigsError) as info:
        parse_yaml_rigs(text, "remote_devices.yaml")
    assert str(info.value).startswith("remote_devices.yaml")
    assert message in str(info.value)


def test_empty_yaml_files() -> None:
    for text in ("", "# nothing\n", "{}\n", "---\n"):
        assert parse_yaml_rigs(text) == {}


def test_toml() -> None:
    text = '[rigs]\nvideo = "udp://10.0.0.2:11001"\n"cameras:left" = "ws://10.0.0.3"\n'
    assert parse_toml_rigs(text, "rigs.toml") == {
        "video": "udp://10.0.0.2:11001",
        "cameras:left": "ws://10.0.0.3",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[rigs\n", "rigs.toml: invalid TOML"),
        ('video = "udp://x"\n', "unknown key(s) 'video'"),
        ("", "no [rigs] table"),
        ("rigs = 3\n", "no [rigs] table"),
        ("[rigs]\nvideo = 11001\n", "rig 'video' must be a URI string"),
        ('[rigs]\nvideo = "bogus://x"\n', "rigs.toml: rig 'video': Unsupported scheme"),
    ],
)
def test_toml_errors(text: str, message: str) -> None:
    with pytest.raises(RigsError) as info:
        parse_toml_rigs(text, "rigs.toml")
    assert message in str(info.value)


def test_load_rigs_by_suffix(tmp_path: Path) -> None:
    (tmp_path / "a.yml").write_text("video: udp://10.0.0.2\n", encoding="utf-8")
    (tmp_path / "b.TOML").write_text('[rigs]\nvideo = "udp://10.0.0.2"\n', encoding="utf-8")
    # iblrig on Windows may leave a byte-order mark.
    (tmp_path / "c.yaml").write_bytes(b"\xef\xbb\xbfvideo: udp://10.0.0.2\n")
    for name in ("a.yml", "b.TOML", "c.yaml"):
        assert load_rigs(tmp_path / name) == {"video": "udp://10.0.0.2"}
    (tmp_path / "d.yaml").write_bytes(b"video: \xff\n")
    with pytest.raises(RigsError, match="is not UTF-8 text"):
        load_rigs(tmp_path / "d.yaml")


@pytest.mark.parametrize(
    "uri",
    ["udp://Video-PC.lab.example.org:11001", "rig-pc.local", "ws://RIG3", "10.0.0.2", "[::1]:9"],
)
def test_host_names_are_left_for_dns(uri: str) -> None:
    assert check_uri(uri, "rig") == uri


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("udp://rig_pc:11001", "Invalid hostname"),
        ("udp://rig-pc.lab:99999", "Invalid port number"),
        ("http://rig-pc.lab", "Unsupported scheme 'http'"),
        ("udp://10.0.0.300", "Invalid"),
    ],
)
def test_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(RigsError, match=message):
        check_uri(uri, "rig")


def test_rig_option() -> None:
    assert parse_rig_option(" video = udp://10.0.0.2 ") == ("video", "udp://10.0.0.2")
    with pytest.raises(RigsError, match="rig 'a': "):
        parse_rig_option("a=b=udp://10.0.0.2")
    for text in ("video", "=udp://x", "video="):
        with pytest.raises(RigsError, match="expected NAME=URI"):
            parse_rig_option(text)
