"""Shared test configuration.

Async tests marked ``pytest.mark.anyio`` run on both backends through the
``anyio_backend`` fixture below. Trio-only tests (``MockClock``) use
``pytest.mark.trio`` from pytest-trio.
"""

from __future__ import annotations

import os

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


@pytest.fixture(
    params=[
        pytest.param("trio", id="trio"),
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """Run every ``pytest.mark.anyio`` test on Trio and on asyncio."""
    return request.param
