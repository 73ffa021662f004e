"""Shared test configuration.

Async tests marked ``pytest.mark.anyio`` run on both backends through the
``anyio_backend`` fixture below. Trio-only tests (``MockClock``) use
``pytest.mark.trio`` from pytest-trio.

The asyncio tests run under the restrictions of Windows' ProactorEventLoop,
where rig PCs live: no ``add_reader``, ``add_writer`` or signal handlers
(:class:`ProactorRules` on other systems, the real ProactorEventLoop on
Windows). trio-rignet must use only what every event loop implements natively.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any, NoReturn

import pytest
from hypothesis import HealthCheck, settings

# Bounded by default so the whole `nox` run stays short on 2 cores; set
# HYPOTHESIS_PROFILE=fuzz for a long run.
settings.register_profile(
    "default", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.register_profile(
    "fuzz", max_examples=20_000, deadline=None, suppress_health_check=list(HealthCheck)
)
_default_profile = "ci" if os.environ.get("CI") else "default"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default_profile))


class ProactorRules(asyncio.SelectorEventLoop):
    """A selector event loop that refuses what ProactorEventLoop does not implement.

    asyncio's own transports use the private ``_add_reader``/``_add_writer``
    and keep working; code that calls the public methods (or AnyIO's
    ``wait_readable``/``wait_writable``, which would fall back to a selector
    thread on Windows) fails loudly instead.
    """

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(
            "ProactorEventLoop (Windows) has no add_reader/add_writer/add_signal_handler: "
            "use asyncio transports and protocols"
        )

    # (asyncio's own sock_connect calls the public remove_writer: those stay.)
    add_reader = add_writer = add_signal_handler = _refuse


def proactor_loop() -> asyncio.AbstractEventLoop:
    """The asyncio loop of the tests: Windows' ProactorEventLoop, or its rules elsewhere."""
    if sys.platform == "win32":  # pragma: no cover - Windows only
        return asyncio.ProactorEventLoop()  # type: ignore[attr-defined,no-any-return]
    return ProactorRules()


@pytest.fixture(
    params=[
        pytest.param("trio", id="trio"),
        pytest.param(("asyncio", {"loop_factory": proactor_loop}), id="asyncio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """Run every ``pytest.mark.anyio`` test on Trio and on asyncio."""
    return request.param
