"""Development sessions.

``nox`` runs tests, interop (against the real iblutil 1.20.0), lint, typecheck and
docs; ``nox -s bench`` (benchmarks against iblutil) is opt-in.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "interop", "lint", "typecheck", "docs"]
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


@nox.session
def interop(session: nox.Session) -> None:
    """Interoperability tests against the reference peer, iblutil 1.20.0.

    iblutil is installed without its dependencies (it would pull a scientific
    stack); its network code needs only colorlog and numpy.
    """
    session.install("-e", ".[test]")
    session.install("--no-deps", "iblutil==1.20.0", "colorlog", "numpy")
    session.run("pytest", "tests/interop", *session.posargs, env={"PYTHONDEVMODE": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against iblutil 1.20.0 (opt-in): ``nox -s bench`` or ``nox -s bench -- --quick``.

    Prints the markdown table of docs/performance.md; a full run also saves
    docs/_static/services_scaling.png. Options after ``--`` go to
    benchmarks/run.py (``--help`` lists them).
    """
    # Editable, so a reused environment always measures the working tree (a plain
    # install of an unchanged version number is not replaced).
    session.install("-e", ".")
    session.install("--no-deps", "iblutil==1.20.0", "colorlog", "numpy")
    session.install("matplotlib")
    session.run("python", "benchmarks/run.py", *session.posargs)
