"""The rig lists of ``rignet run``: iblrig's ``remote_devices.yaml``, a TOML file, ``NAME=URI``.

iblrig keeps the lab's auxiliary rigs in ``remote_devices.yaml``, a flat
mapping of rig name to URI written with ``yaml.safe_dump``::

    cameras: udp://192.168.1.20:11001
    neuropixel: 192.168.1.21

(a bare address means ``udp://ADDRESS:11001``). That file is read here as it
is, without a YAML library: the subset parser below accepts what
``yaml.safe_dump`` writes for a mapping of strings (plain, single- or
double-quoted scalars, comments, ``---``, a one-line ``{...}`` mapping) and
rejects anything else with the line number. The TOML form is a ``[rigs]``
table::

    [rigs]
    cameras = "udp://192.168.1.20:11001"
    neuropixel = "ws://192.168.1.21:11001"

Pure code: no sockets; host names are not resolved here.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ._uri import validate_uri

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "RigsError",
    "check_uri",
    "load_rigs",
    "parse_rig_option",
    "parse_toml_rigs",
    "parse_yaml_rigs",
    "rig_options",
    "rigs_from",
]


class RigsError(ValueError):
    """A rig list cannot be used; the message says where and what to write instead."""


# ------------------------------------------------------------------ one rig


def parse_rig_option(text: str) -> tuple[str, str]:
    """``"video=udp://10.0.0.2:11001"`` -> ``("video", "udp://10.0.0.2:11001")``.

    Raises:
        RigsError: no ``=``, an empty name, or a URI that cannot be valid.
    """
    name, sep, uri = text.partition("=")
    name, uri = name.strip(), uri.strip()
    if not sep or not name or not uri:
        raise RigsError(f"expected NAME=URI, e.g. video=udp://10.0.0.2:11001, got {text!r}")
    return name, check_uri(uri, f"rig {name!r}")


_URI_PARTS = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?(?P<host>\[[^\]]*\]|[^:/\[\]]*)(?P<rest>(?::.*)?)$"
)


def check_uri(uri: str, what: str) -> str:
    """Return ``uri`` if it can be a rig's address; host names are resolved later.

    The scheme, port and IP address are checked as :func:`validate_uri` does,
    without DNS: a host name that is not an IP address is only checked for
    characters a host name may contain.

    Raises:
        RigsError: the scheme, port or address is invalid.
    """
    try:
        validate_uri(uri, resolve_host=False)
    except (TypeError, ValueError) as exc:
        # Without DNS, validate_uri accepts only simple host names; a name such
        # as rig-pc.lab.local is fine if everything but the host is.
        match = _URI_PARTS.match(uri)
        host = match["host"] if match else ""
        if not (
            match
            and re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host)
            and not re.fullmatch(r"[0-9.]+", host)  # meant as an IP address, and invalid
        ):
            raise RigsError(f"{what}: {exc}") from None
        try:
            validate_uri(f"{match['scheme'] or ''}127.0.0.1{match['rest']}", resolve_host=False)
        except (TypeError, ValueError) as exc2:
            raise RigsError(f"{what}: {exc2}") from None
    return uri


# ------------------------------------------------------------ command line


def rig_options(parser: argparse.ArgumentParser) -> None:
    """``--rigs FILE`` and ``--rig NAME=URI`` (shared by every command that takes rigs)."""
    group = parser.add_argument_group("rigs (at least one of)")
    group.add_argument(
        "--rigs",
        metavar="FILE",
        dest="rigs_file",
        help="rigs file: iblrig's remote_devices.yaml (`name: URI` lines) or a .toml file "
        'with a [rigs] table (name = "URI")',
    )
    group.add_argument(
        "--rig",
        metavar="NAME=URI",
        action="append",
        default=[],
        dest="rig",
        help="a rig, e.g. --rig video=udp://10.0.0.2:11001; repeatable; replaces the "
        "file's entry of that name",
    )


def rigs_from(args: argparse.Namespace) -> dict[str, str]:
    """The rigs of ``--rigs FILE`` and ``--rig NAME=URI``, in order (usage error if none)."""
    parser: argparse.ArgumentParser = args.parser
    rigs: dict[str, str] = {}
    try:
        if args.rigs_file is not None:
            rigs.update(load_rigs(args.rigs_file))
        for text in args.rig:
            name, uri = parse_rig_option(text)
            rigs[name] = uri
    except RigsError as exc:
        parser.error(str(exc))
    if not rigs:
        parser.error(
            "no rigs: pass --rigs FILE (e.g. iblrig's remote_devices.yaml) or "
            "--rig NAME=URI (repeatable)"
        )
    return rigs


# -------------------------------------------------------------------- files


def load_rigs(path: str | Path) -> dict[str, str]:
    """Read a rigs file: ``.yaml``/``.yml`` (iblrig's form) or ``.toml``.

    Raises:
        RigsError: unreadable, malformed, empty, or a rig without a valid URI.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise RigsError(f"cannot read rigs file {str(file)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise RigsError(f"rigs file {str(file)!r} is not UTF-8 text: {exc}") from None
    suffix = file.suffix.lower()
    if suffix in (".yaml", ".yml"):
        rigs = parse_yaml_rigs(text, str(file))
    elif suffix == ".toml":
        rigs = parse_toml_rigs(text, str(file))
    else:
        raise RigsError(
            f"rigs file {str(file)!r}: name it .yaml (iblrig's remote_devices.yaml: "
            '`name: URI` lines) or .toml (a [rigs] table of name = "URI")'
        )
    if not rigs:
        raise RigsError(f"rigs file {str(file)!r} lists no rigs")
    return rigs


def parse_toml_rigs(text: str, source: str) -> dict[str, str]:
    """The ``[rigs]`` table of a TOML document: rig name -> URI.

    Raises:
        RigsError: invalid TOML, no ``[rigs]`` table, other keys, or a value that is
            not a URI string.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RigsError(f"{source}: invalid TOML: {exc}") from None
    example = '[rigs]\nvideo = "udp://10.0.0.2:11001"'
    unknown = sorted(set(document) - {"rigs"})
    if unknown:
        raise RigsError(
            f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; a rigs file holds "
            f"one table, e.g.\n{example}"
        )
    table = document.get("rigs")
    if not isinstance(table, dict):
        raise RigsError(f"{source}: no [rigs] table; write e.g.\n{example}")
    rigs: dict[str, str] = {}
    for name, uri in table.items():
        if not isinstance(uri, str):
            raise RigsError(
                f"{source}: rig {name!r} must be a URI string, e.g. {name} = "
                f'"udp://10.0.0.2:11001", not {type(uri).__name__} {uri!r}'
            )
        rigs[name] = check_uri(uri.strip(), f"{source}: rig {name!r}")
    return rigs


# --------------------------------------------------------------------- YAML

_NULLS = {"", "~", "null", "Null", "NULL"}
_ESCAPES = {
    "0": "\0",
    "a": "\a",
    "b": "\b",
    "t": "\t",
    "\t": "\t",
    "n": "\n",
    "v": "\v",
    "f": "\f",
    "r": "\r",
    "e": "\x1b",
    " ": " ",
    '"': '"',
    "/": "/",
    "\\": "\\",
    "N": "\x85",
    "_": "\xa0",
    "L": "\u2028",
    "P": "\u2029",
}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


class _Line:
    """One line of the file being parsed, consumed from left to right."""

    def __init__(self, text: str, number: int, source: str) -> None:
        self.text = text
        self.pos = 0
        self.number = number
        self.source = source

    def error(self, message: str) -> RigsError:
        return RigsError(f"{self.source}, line {self.number}: {message}")

    def skip_spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def at_end(self) -> bool:
        """Only spaces and a comment remain."""
        self.skip_spaces()
        return self.pos >= len(self.text) or self.text[self.pos] == "#"

    def quoted(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text):
                raise self.error(
                    f"unterminated {quote}...{quote} string (strings must end on their line)"
                )
            ch = self.text[self.pos]
            self.pos += 1
            if ch == quote:
                if quote == "'" and self.text[self.pos : self.pos + 1] == "'":
                    out.append("'")  # '' is a quote inside '...'
                    self.pos += 1
                    continue
                return "".join(out)
            if ch == "\\" and quote == '"':
                out.append(self._escape())
            else:
                out.append(ch)

    def _escape(self) -> str:
        if self.pos >= len(self.text):
            raise self.error('a "..." string ends with a backslash')
        ch = self.text[self.pos]
        self.pos += 1
        if ch in _ESCAPES:
            return _ESCAPES[ch]
        if ch in _HEX_ESCAPES:
            digits = self.text[self.pos : self.pos + _HEX_ESCAPES[ch]]
            if len(digits) == _HEX_ESCAPES[ch] and re.fullmatch(r"[0-9A-Fa-f]+", digits):
                self.pos += len(digits)
                return chr(int(digits, 16))
        raise self.error(f"unknown escape \\{ch} in a double-quoted string")

    def plain(self, stop: str) -> str:
        """A plain scalar up to ``": "``, a comment, or one of ``stop`` (flow context)."""
        start = self.pos
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch == ":" and (self.pos + 1 == len(text) or text[self.pos + 1] in " \t" + stop):
                break
            if ch == "#" and self.pos > start and text[self.pos - 1] in " \t":
                break
            if ch in stop:
                break
            self.pos += 1
        return text[start : self.pos].rstrip(" \t")

    def scalar(self, stop: str = "") -> tuple[str, bool]:
        """The next scalar and whether it was quoted."""
        self.skip_spaces()
        if self.pos < len(self.text) and self.text[self.pos] in "'\"":
            return self.quoted(), True
        if self.pos < len(self.text) and self.text[self.pos] in "[{&*!|>%@`":
            raise self.error(
                f"{self.text[self.pos]!r} starts YAML that a rig list does not use; write "
                "`name: URI` lines as iblrig does"
            )
        return self.plain(stop), False

    def colon(self) -> None:
        self.skip_spaces()
        if self.text[self.pos : self.pos + 1] != ":":
            raise self.error("expected `name: URI`")
        self.pos += 1


def parse_yaml_rigs(text: str, source: str = "<rigs>") -> dict[str, str]:
    """Rig name -> URI from iblrig's ``remote_devices.yaml`` (a flat YAML mapping).

    Raises:
        RigsError: YAML beyond a flat mapping of strings (nested entries, lists,
            multi-line strings), a repeated name, or a rig without a valid URI.
    """
    pairs: list[tuple[str, str, int]] = []
    started = ended = False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _Line(raw, number, source)
        if line.at_end():
            continue
        if ended:
            raise line.error("a rigs file holds one YAML document; nothing may follow its end")
        if raw.startswith("---") and raw[3:4] in ("", " ", "\t"):
            if started or pairs:
                raise line.error("a rigs file holds one YAML document; remove the second `---`")
            started = True
            line.pos = 3
            if line.at_end():
                continue
        elif raw.rstrip() == "...":
            ended = True
            continue
        elif raw[:1] in (" ", "\t"):
            raise line.error(
                "indented line: a rig list is flat (`name: URI` at the start of each "
                "line); nested entries and multi-line values are not rig URIs"
            )
        if raw[line.pos] == "{":
            if pairs:
                raise line.error("a `{...}` mapping must be the whole document")
            pairs.extend(_flow_mapping(line))
            ended = True  # nothing may follow but comments
            continue
        indicator = raw[line.pos : line.pos + 2]
        if indicator in ("-", "- ", "-\t"):
            raise line.error("a YAML list is not a rig list; write one `name: URI` line per rig")
        if indicator in ("?", "? ", "?\t"):
            raise line.error("complex `? key` entries are not a rig list; use `name: URI`")
        name, _ = line.scalar()
        line.colon()
        uri, quoted = line.scalar()
        if not line.at_end():
            raise line.error(f"unexpected text after the URI of {name!r}")
        pairs.append(_pair(line, name, uri, quoted))
    rigs: dict[str, str] = {}
    seen: dict[str, int] = {}
    for name, uri, number in pairs:
        if name in seen:
            raise RigsError(
                f"{source}, line {number}: rig {name!r} is listed twice (also line {seen[name]})"
            )
        seen[name] = number
        rigs[name] = check_uri(uri, f"{source}, line {number}: rig {name!r}")
    return rigs


def _pair(line: _Line, name: str, uri: str, quoted: bool) -> tuple[str, str, int]:
    if not name:
        raise line.error("a rig needs a name before the `:`")
    if not quoted and uri in _NULLS:
        raise line.error(f"rig {name!r} has no URI; write e.g. `{name}: udp://10.0.0.2:11001`")
    return name, uri, line.number


def _flow_mapping(line: _Line) -> list[tuple[str, str, int]]:
    """``{a: udp://..., b: ws://...}`` on one line (older PyYAML's flow style)."""
    line.pos += 1  # the {
    pairs: list[tuple[str, str, int]] = []
    while True:
        line.skip_spaces()
        if line.text[line.pos : line.pos + 1] == "}":
            line.pos += 1
            break
        name, _ = line.scalar(stop=",}")
        line.colon()
        uri, quoted = line.scalar(stop=",}")
        pairs.append(_pair(line, name, uri, quoted))
        line.skip_spaces()
        ch = line.text[line.pos : line.pos + 1]
        line.pos += 1
        if ch == "}":
            break
        if ch != ",":
            raise line.error("expected `,` or `}` in the `{...}` mapping (it must fit on one line)")
    if not line.at_end():
        raise line.error("unexpected text after the `{...}` mapping")
    return pairs
