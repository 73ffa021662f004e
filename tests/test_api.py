"""The public API: everything exported is documented, and async methods say what
cancellation leaves behind."""

from __future__ import annotations

import inspect

import pytest

import trio_rignet

PUBLIC = [name for name in trio_rignet.__all__ if name != "__version__"]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_docstring(name: str) -> None:
    obj = getattr(trio_rignet, name)
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return  # constants and type aliases are documented in the API reference
    assert inspect.getdoc(obj), f"{name} has no docstring"


def _public_async_methods() -> list[tuple[str, str]]:
    found = []
    for cls_name in ("EchoProtocol", "Services", "RigService"):
        cls = getattr(trio_rignet, cls_name)
        for name, member in inspect.getmembers(cls):
            func = getattr(member, "__func__", member)
            is_async = inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)
            if not name.startswith("_") and (is_async or name in ("subscribe", "open")):
                found.append((cls_name, name))
    return found


@pytest.mark.parametrize(("cls_name", "name"), _public_async_methods())
def test_async_method_documents_cancellation(cls_name: str, name: str) -> None:
    doc = inspect.getdoc(getattr(getattr(trio_rignet, cls_name), name)) or ""
    assert "ancel" in doc, f"{cls_name}.{name} does not say what cancellation leaves behind"


def test_every_public_method_has_a_docstring() -> None:
    missing = [
        f"{cls_name}.{name}"
        for cls_name in ("EchoProtocol", "Services", "RigService", "StreamDecoder", "EchoStats")
        for name, member in inspect.getmembers(getattr(trio_rignet, cls_name))
        if not name.startswith("_") and callable(member) and not inspect.getdoc(member)
    ]
    assert missing == []
