"""Rig addresses given on the command line, checked before anything is opened.

Pure code: no sockets; host names are not resolved here.
"""

from __future__ import annotations

import re

from ._uri import validate_uri

__all__ = ["RigsError", "check_uri"]


class RigsError(ValueError):
    """A rig list cannot be used; the message says where and what to write instead."""


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
