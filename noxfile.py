"""Development sessions.

``nox`` runs tests, interop (against the real iblutil 1.20.0), lint, typecheck,
docs and lowest (the lowest dependency versions pyproject.toml allows);
``nox -s bench`` (benchmarks against iblutil) is opt-in.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "interop", "lint", "typecheck", "docs", "lowest"]
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


# The tests of everything that runs on the event loop (endpoints, Services, rigs,
# the command), without the slow property-based and fault-injection suites.
LOWEST_TESTS = [
    "tests/test_api.py",
    "tests/test_uri.py",
    "tests/test_echo_udp_tcp.py",
    "tests/test_echo_timeouts.py",
    "tests/test_services.py",
    "tests/test_rig.py",
    "tests/test_ipv6.py",
    "tests/test_limits.py",
    "tests/test_cli_rigs.py",
    "tests/test_cli.py::test_demo_in_process",
    "tests/test_cli.py::test_send_every_event_in_process",
    "tests/test_cli.py::test_run_three_rigs",
    "tests/test_cli.py::test_run_with_rigs_down",
    "tests/test_cli.py::test_run_rig_that_never_connects",
    "tests/test_cli.py::test_ctrl_c_while_a_rig_connects",
    "tests/test_cli.py::test_verbose_anywhere_and_log_file",
]


@nox.session(reuse_venv=False)
def lowest(session: nox.Session) -> None:
    """The lowest versions of the direct dependencies that pyproject.toml allows.

    uv's ``--resolution lowest-direct`` installs anyio, trio (and on Python 3.10
    exceptiongroup and tomli) and the test tools at their declared floors, so a
    floor too low for the code fails here. A fresh environment every time: uv
    would keep newer versions already installed. Runs LOWEST_TESTS (about a
    minute and a half on 2 cores), or the tests given after ``--``.
    """
    session.install("uv")
    env = {"VIRTUAL_ENV": str(session.virtualenv.location)}
    session.run("uv", "pip", "install", "--resolution", "lowest-direct", "-e", ".[test]", env=env)
    session.run("uv", "pip", "list", env=env)
    session.run("pytest", *(session.posargs or LOWEST_TESTS), env={"PYTHONDEVMODE": "1"})


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

    Prints the markdown tables of docs/performance.md; a full run also saves
    docs/_static/services_scaling.png and docs/_static/clock_offset.png. Options after ``--`` go to
    benchmarks/run.py (``--help`` lists them).
    """
    # Editable, so a reused environment always measures the working tree (a plain
    # install of an unchanged version number is not replaced).
    session.install("-e", ".")
    session.install("--no-deps", "iblutil==1.20.0", "colorlog", "numpy")
    session.install("matplotlib")
    session.run("python", "benchmarks/run.py", *session.posargs)
