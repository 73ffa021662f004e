"""Interoperability tests against the reference peer, iblutil 1.20.0.

Every test here is skipped unless iblutil 1.20.0 is installed: run them with
``nox -s interop``, which installs it. On the Trio backend iblutil runs in a
subprocess with its own asyncio loop (``ibl_peer.py``); on the asyncio backend it
runs inside the test's own loop, next to trio-rignet.

The skip is an autouse fixture rather than ``pytest.importorskip`` at the top
of this file: a conftest that raises ``Skipped`` while it is loaded aborts the
whole run when ``tests/interop`` is named on the command line.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest

_HOW = "run `nox -s interop`, which installs it"


def _missing() -> str | None:
    try:
        found = importlib.util.find_spec("iblutil.io.net.app") is not None
    except ImportError:
        found = False
    if not found:
        return f"needs the reference peer iblutil 1.20.0, which is not installed: {_HOW}"
    version = importlib.metadata.version("iblutil")
    if version != "1.20.0":
        return f"needs the reference peer iblutil 1.20.0, found {version}: {_HOW}"
    return None


_SKIP_REASON = _missing()


@pytest.fixture(autouse=True)
def _needs_iblutil() -> None:
    if _SKIP_REASON is not None:
        pytest.skip(_SKIP_REASON)


@pytest.fixture
def open_ibl(anyio_backend: object) -> object:
    """``open_ibl(config)``: an async context manager yielding a started iblutil peer.

    A subprocess on the Trio backend, in the test's own loop on asyncio.
    """
    from functools import partial

    from interop_support import ibl_peer_for

    return partial(ibl_peer_for, anyio_backend)
