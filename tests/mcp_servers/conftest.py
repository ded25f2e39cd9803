"""Shared parts of the MCP tests: real server processes and the databases behind them.

Also imported by tests/models/test_mcp_utils.py (its fixtures and helpers are the same)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from datus.models.mcp_utils import MCPServerStdio

FAKE_SERVER = Path(__file__).resolve().parents[1] / "fakes" / "mcp_tool_server.py"
REFERENCE_VENV = Path(
    os.environ.get("DQ_TEST_MCP_SQLITE_VENV", "~/.cache/datus-queue/mcp-server-sqlite-venv")
).expanduser()


def sql_server(db: Path | str, *args: str, **spec: object) -> MCPServerStdio:
    """The shipped read-only SQL server on a SQLite file (or any URL given as ``db``)."""
    url = str(db) if "://" in str(db) else f"sqlite:///{db}"
    return MCPServerStdio(command=sys.executable, args=["-m", "datus.mcp_servers.sql_server", "--url", url, *args],
                          **spec)  # type: ignore[arg-type]


def fake_server(*args: str, **spec: object) -> MCPServerStdio:
    return MCPServerStdio(command=sys.executable, args=[str(FAKE_SERVER), *args], **spec)  # type: ignore[arg-type]


def make_shop_db(path: Path, rows: int = 30) -> Path:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(
            """
            CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT);
            CREATE TABLE orders (
                id INTEGER PRIMARY KEY,
                customer_id INTEGER NOT NULL REFERENCES customers(id),
                amount NUMERIC(10, 2) NOT NULL
            );
            CREATE VIEW big_orders AS SELECT * FROM orders WHERE amount > 100;
            """
        )
        conn.executemany("INSERT INTO customers (name, city) VALUES (?, ?)",
                         [(f"customer {i}", "Berlin" if i % 2 else "Lisbon") for i in range(rows)])
        conn.executemany("INSERT INTO orders (customer_id, amount) VALUES (?, ?)",
                         [(i % rows + 1, 10.5 * i) for i in range(rows)])
        conn.commit()
    return path


@pytest.fixture
def shop_db(tmp_path: Path) -> Path:
    return make_shop_db(tmp_path / "shop.db")


def count_rows(db: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def http_server(*command: str) -> Iterator[str]:
    """Run a streamable-HTTP MCP server (``command`` gets ``--port N`` appended); yield its URL."""
    port = free_port()
    process = subprocess.Popen([*command, "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the HTTP MCP server exited: {process.stderr.read() if process.stderr else ''}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the HTTP MCP server did not listen within 30s") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.kill()
        process.wait()
        if process.stderr:
            process.stderr.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")
def reference_sqlite_server() -> Path:
    return build_reference_sqlite_server()


def build_reference_sqlite_server() -> Path:
    """``mcp-server-sqlite`` from PyPI, in its own venv with ``mcp<2`` (it crashes on mcp 2),
    built once under ~/.cache/datus-queue and reused; skips the test when pip cannot install it."""
    executable = REFERENCE_VENV / "bin" / "mcp-server-sqlite"
    marker = REFERENCE_VENV / ".datus-complete"
    REFERENCE_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(REFERENCE_VENV.with_name(REFERENCE_VENV.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test runs build it once
        if marker.exists() and executable.exists():
            return executable
        shutil.rmtree(REFERENCE_VENV, ignore_errors=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(REFERENCE_VENV)], check=True, capture_output=True,
                           timeout=300)
            pip = subprocess.run(
                [str(REFERENCE_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet",
                 "--disable-pip-version-check", "mcp-server-sqlite", "mcp<2"],
                check=False, capture_output=True, text=True, timeout=900,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            shutil.rmtree(REFERENCE_VENV, ignore_errors=True)
            pytest.skip(f"cannot build a venv for mcp-server-sqlite: {exc}")
        if pip.returncode != 0 or not executable.exists():
            shutil.rmtree(REFERENCE_VENV, ignore_errors=True)
            tail = " | ".join((pip.stderr or pip.stdout).strip().splitlines()[-3:])
            pytest.skip(f"pip cannot install mcp-server-sqlite with mcp<2: {tail}")
        marker.touch()
    return executable
