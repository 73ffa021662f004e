"""Exception-group helpers for the task groups behind each context manager."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["collapse_single"]


@contextmanager
def collapse_single() -> Iterator[None]:
    """Re-raise a task group's exception group that holds exactly one exception as that exception.

    Task groups wrap whatever the body of ``async with`` raises in an
    exception group. An endpoint's task group is an implementation detail, so
    ``except EchoTimeout`` around ``async with EchoProtocol.client(...)`` must
    keep working: a lone exception is unwrapped, several stay grouped.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) != 1:
            raise
        exc = leaves[0]
        raise exc from exc.__cause__


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
