"""Development sessions: ``nox`` runs tests, lint, typecheck and docs.

``nox -s interop`` and ``nox -s bench`` are opt-in.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite with coverage, on Trio and asyncio."""
    session.install("-e", ".[test]")
    session.run(
        "pytest",
        "--cov=trio_rignet",
        "--cov-report=term",
        *session.posargs,
        env={"PYTHONDEVMODE": "1"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install(".[lint]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the library."""
    session.install("-e", ".[typecheck]")
    session.run("mypy", "src/")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx docs with warnings as errors."""
    session.install("-e", ".[docs]")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
