"""Sphinx configuration for trio-rignet."""

from __future__ import annotations

import re
from typing import Any

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.util import logging

import trio_rignet

project = "trio-rignet"
author = "trio-rignet developers"
copyright = "2026, trio-rignet developers. MIT License"
release = trio_rignet.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# No network at build time: intersphinx inventories are not fetched.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
nitpicky = False

html_theme = "furo"
html_title = f"trio-rignet {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]

# Copy buttons copy commands, not prompts or output: in a block with `$ ` prompts
# only the prompted lines are copied, without the prompt.
copybutton_prompt_text = r"\$ |>>> |\.\.\. "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = True

_log = logging.getLogger(__name__)


def _is_private(cls: type) -> bool:
    """A class users cannot import from a public place (``trio_rignet._events.Events``)."""
    module = getattr(cls, "__module__", "")
    public = getattr(trio_rignet, cls.__name__, None) is cls
    return not public and any(part.startswith("_") for part in module.split("."))


def _no_private_bases(app: Sphinx, name: str, obj: Any, options: Any, bases: list[Any]) -> None:
    """Fail the build (-W) when the API reference would show a private base class.

    Such a class gets ``:no-show-inheritance:`` in api.md, or a public base.
    """
    if not getattr(options, "show_inheritance", None) and not _option(options, "show-inheritance"):
        return
    private = [base for base in bases if isinstance(base, type) and _is_private(base)]
    if private:
        names = ", ".join(f"{b.__module__}.{b.__qualname__}" for b in private)
        _log.warning(
            "%s: the API reference would show private base class %s; add "
            ":no-show-inheritance: to its autoclass directive",
            name,
            names,
        )


def _option(options: Any, name: str) -> Any:
    """An autodoc option, from a dict (older Sphinx) or an options object."""
    try:
        return options.get(name)
    except AttributeError:
        return getattr(options, name.replace("-", "_"), None)


_PRIVATE_PATH = re.compile(r"\btrio_rignet\.(?:_\w+\.)+(\w+)")


def _public_paths(app: Sphinx, doctree: nodes.document) -> None:
    """Show ``trio_rignet._messages.ExpMessage`` (from a type annotation) as ``ExpMessage``."""

    def public(match: re.Match[str]) -> str:
        name = match[1]
        return name if name in trio_rignet.__all__ else match[0]

    for xref in doctree.findall(addnodes.pending_xref):
        target = xref.get("reftarget", "")
        if _PRIVATE_PATH.search(target):
            xref["reftarget"] = _PRIVATE_PATH.sub(lambda m: f"trio_rignet.{public(m)}", target)
            for text in list(xref.findall(nodes.Text)):
                text.parent.replace(text, nodes.Text(_PRIVATE_PATH.sub(public, str(text))))


def _readable_defaults(
    app: Sphinx,
    what: str,
    name: str,
    obj: Any,
    options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None]:
    """``task_status=anyio.TASK_STATUS_IGNORED``, not the repr of AnyIO's private object."""
    if signature:
        signature = re.sub(
            r"<anyio\.[\w.]*_IgnoredTaskStatus object[^>]*>", "anyio.TASK_STATUS_IGNORED", signature
        )
    return signature, return_annotation


def _mark_wide_tables(app: Sphinx, doctree: nodes.document) -> None:
    """Tables of four or more columns (the benchmark results) get the class ``wide``."""
    for table in doctree.findall(nodes.table):
        groups = list(table.findall(nodes.tgroup))
        if groups and int(groups[0].get("cols", 0)) >= 4:
            table["classes"].append("wide")


def setup(app: Sphinx) -> None:
    """Register the hooks above."""
    app.connect("autodoc-process-bases", _no_private_bases)
    app.connect("doctree-read", _mark_wide_tables)
    app.connect("doctree-read", _public_paths)
    app.connect("autodoc-process-signature", _readable_defaults)
