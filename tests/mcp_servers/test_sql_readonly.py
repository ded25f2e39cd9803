"""The one read-only executor (datus.models.sql_readonly), shared by the SQL server and the batch
scorer: bounded output (rows, bytes, cells), the parser's refusals (executable comments
included), and the database's own refusal of writes with the parser bypassed — on SQLite, on
Postgres when DQ_TEST_POSTGRES_URL is set, on MariaDB/MySQL when one is reachable
(DQ_TEST_MYSQL_URL, default root over the local socket) and PyMySQL is installed."""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from datus.models.sql_engines import with_driver
from datus.models.sql_readonly import (
    CELL_MARKER,
    OutputLimits,
    ReadOnlyExecutor,
    ReadOnlyViolation,
    check_read_only,
)
from datus_queue.tasks.batch import scoring
from tests.mcp_servers.conftest import sql_server
from tests.mcp_servers.test_sql_server import connected

EXECUTABLE_COMMENTS = ["/*!DELETE FROM t WHERE 1=1 OR */ (SELECT 1)", "SELECT 1 /*!INTO OUTFILE 'x'*/",
                       "SELECT 1 /*M!50000 INTO OUTFILE 'x'*/", "SELECT 1 /*!50000 , SLEEP(1)*/"]
ZEROBLOBS = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200) "
             "SELECT i, zeroblob(2000000) AS blob FROM n")
POSTGRES_URL = os.environ.get("DQ_TEST_POSTGRES_URL")
needs_postgres = pytest.mark.skipif(not POSTGRES_URL, reason="set DQ_TEST_POSTGRES_URL to run against Postgres")


@pytest.fixture
def db(tmp_path: Path) -> str:
    path = tmp_path / "ro.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, note TEXT)")
        conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"row {i}") for i in range(1, 6)])
    return f"sqlite:///{path}"


def _peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def test_200_zeroblobs_stay_under_the_byte_cap(db: str) -> None:
    """800 MB of JSON before (issue 19): now the rows stop at the byte cap, each cell cut, and
    the process never holds more than a few blobs at once."""
    limits = OutputLimits()
    executor = ReadOnlyExecutor(db, limits=limits)
    before = _peak_rss_kb()
    try:
        result = executor.query(ZEROBLOBS)
    finally:
        executor.dispose()
    grown_mb = (_peak_rss_kb() - before) / 1024
    answer = json.dumps(result.to_dict())
    assert result.bytes <= limits.max_bytes and len(answer) <= limits.max_bytes + 1024
    assert result.truncated and result.truncated_by == ["bytes", "cells"]
    assert 0 < len(result.rows) < 200 and result.cells_truncated == len(result.rows)
    first_blob = result.rows[0][1]
    assert first_blob.startswith("0000") and first_blob.endswith(CELL_MARKER.format(2_000_000 - 8_000))
    assert "bytes as JSON" in result.reason and "cut" in result.reason
    assert grown_mb < 64, f"peak RSS grew by {grown_mb:.0f} MB"


def test_the_scorer_is_bounded_too(db: str) -> None:
    before = _peak_rss_kb()
    result = scoring.execute_sql(db, ZEROBLOBS, max_bytes=1_000_000, max_cell_bytes=100_000)
    grown_mb = (_peak_rss_kb() - before) / 1024
    assert result.error is None and result.truncated and "bytes as JSON" in (result.truncation or "")
    assert 0 < len(result.rows) < 200 and all(len(row[1]) == 100_000 for row in result.rows)
    assert grown_mb < 64, f"peak RSS grew by {grown_mb:.0f} MB"
    scoring.dispose_engines()


async def test_the_server_answers_within_the_byte_cap(db: str) -> None:
    async with connected(sql_server(db.removeprefix("sqlite:///"), "--max-bytes", "50000",
                                    "--max-cell-bytes", "1000")) as sql:
        answer = await sql.call_tool("read_query", {"query": ZEROBLOBS})
        assert not answer.is_error, answer.text
        assert len(answer.text) <= 50_000 + 1024
        shown = json.loads(answer.text)
        assert shown["truncated"] and shown["truncated_by"] == ["bytes", "cells"] and "bytes" in shown["reason"]
        assert shown["rows"][0][1].endswith("…[truncated 1999500 bytes]")
        refused = await sql.call_tool("read_query", {"query": EXECUTABLE_COMMENTS[0]})
        assert refused.is_error and "executable comments" in refused.text


def test_rows_and_long_text_are_marked(db: str) -> None:
    executor = ReadOnlyExecutor(db, limits=OutputLimits(max_rows=3, max_cell_bytes=20))
    try:
        rows = executor.query("SELECT id FROM t ORDER BY id").to_dict()
        assert rows["rows"] == [[1], [2], [3]] and rows["truncated_by"] == ["rows"]
        assert "more than 3 rows" in rows["reason"]
        whole = executor.query("SELECT id FROM t WHERE id < 3").to_dict()
        assert whole == {"columns": ["id"], "rows": [[1], [2]], "row_count": 2, "truncated": False}
        long = executor.query("SELECT 'é' || printf('%.100c', 'x') AS s").to_dict()
        assert long["truncated_by"] == ["cells"]
        assert long["rows"][0][0] == "é" + "x" * 18 + CELL_MARKER.format(82)
    finally:
        executor.dispose()


@pytest.mark.parametrize("sql", EXECUTABLE_COMMENTS)
@pytest.mark.parametrize("dialect", [None, "mysql", "mariadb", "sqlite", "postgresql"])
def test_executable_comments_are_refused_by_the_parser(sql: str, dialect: str | None) -> None:
    with pytest.raises(ReadOnlyViolation, match="executable comments"):
        check_read_only(sql, dialect)
    assert "executable comments" in (scoring.validate_sql(sql, dialect) or "")


def test_plain_comments_still_pass() -> None:
    assert check_read_only("SELECT 1 /* a comment */ -- and another", "mysql") == "query"


def test_sqlite_refuses_writes_past_the_parser(db: str, tmp_path: Path) -> None:
    executor = ReadOnlyExecutor(db)
    try:
        for statement in ("DELETE FROM t", "INSERT INTO t VALUES (9, 'x')", "CREATE TABLE u (x)",
                          "PRAGMA query_only = OFF; DELETE FROM t", f"ATTACH DATABASE '{tmp_path / 'x.db'}' AS x"):
            with pytest.raises(sqlite3.Error):
                executor.execute(statement)
        assert executor.execute("SELECT count(*) FROM t").rows == [[5]]
    finally:
        executor.dispose()
    writable = create_engine(db)  # an engine of the caller's: guarded for the query, given back as it was
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
            ReadOnlyExecutor(writable).execute("DELETE FROM t")
        with writable.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (6, 'six')"))
            assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 6
    finally:
        writable.dispose()


@needs_postgres
def test_postgres_refuses_writes_past_the_parser() -> None:
    assert POSTGRES_URL
    table = f"dq_ro_{uuid.uuid4().hex[:8]}"
    admin = create_engine(with_driver(POSTGRES_URL))
    with admin.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (id int, b bytea)"))
        conn.execute(text(f"INSERT INTO {table} SELECT i, decode(repeat('00', 1000000), 'hex') "
                          "FROM generate_series(1, 200) i"))
    executor = ReadOnlyExecutor(POSTGRES_URL)
    try:
        for statement in (f"DELETE FROM {table}", f"CREATE TABLE {table}_x (x int)", f"UPDATE {table} SET id = 0"):
            with pytest.raises(Exception, match="read-only transaction"):
                executor.execute(statement, stream=False)
        big = executor.query(f"SELECT id, b FROM {table} ORDER BY id")
        assert big.truncated_by == ["bytes", "cells"] and big.bytes <= executor.limits.max_bytes
        assert executor.execute(f"SELECT count(*) FROM {table}").rows == [[200]]
    finally:
        executor.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP TABLE {table}"))
        admin.dispose()


# -- MariaDB / MySQL ----------------------------------------------------------------------------

MYSQL_ADMIN_URL = os.environ.get(
    "DQ_TEST_MYSQL_URL", "mysql+pymysql://root@localhost/?unix_socket=/run/mysqld/mysqld.sock")


@pytest.fixture(scope="module")
def mysql() -> Iterator[dict[str, Any]]:
    """A database with a table, an admin URL on it, and a reader's (SELECT only, no FILE)."""
    pytest.importorskip("pymysql")
    from sqlalchemy.engine import make_url

    name = f"dq_ro_{uuid.uuid4().hex[:8]}"
    admin = create_engine(MYSQL_ADMIN_URL)
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
            conn.execute(text(f"CREATE TABLE {name}.t (id INT PRIMARY KEY, note TEXT)"))
            conn.execute(text(f"INSERT INTO {name}.t VALUES (1, 'one'), (2, 'two')"))
            conn.execute(text(f"CREATE USER IF NOT EXISTS '{name}'@'localhost' IDENTIFIED BY 'pw-{name}'"))
            conn.execute(text(f"GRANT SELECT ON {name}.* TO '{name}'@'localhost'"))
    except Exception as exc:  # noqa: BLE001 - no server, no rights: skip, saying why
        admin.dispose()
        pytest.skip(f"no MariaDB/MySQL at DQ_TEST_MYSQL_URL: {str(exc)[:120]}")
    base = make_url(MYSQL_ADMIN_URL)
    try:
        yield {"admin": base.set(database=name), "reader": base.set(database=name, username=name,
                                                                     password=f"pw-{name}"), "name": name}
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE {name}"))
            conn.execute(text(f"DROP USER '{name}'@'localhost'"))
        admin.dispose()


def test_mysql_executable_comments_are_refused_by_the_database(mysql: dict[str, Any]) -> None:
    """Past the parser: the read-only transaction refuses the hidden DELETE (even as root); the
    hidden INTO OUTFILE is not a write a transaction knows of, so it is the reader's missing
    FILE privilege that refuses it — hence the read-only user the docs ask for."""
    admin = ReadOnlyExecutor(mysql["admin"])
    reader = ReadOnlyExecutor(mysql["reader"])
    try:
        for statement in (EXECUTABLE_COMMENTS[0], "DELETE FROM t", "INSERT INTO t VALUES (3, 'x')"):
            with pytest.raises(Exception, match="READ ONLY transaction"):
                admin.execute(statement, stream=False)
            with pytest.raises(Exception, match="command denied"):  # the reader: its privileges first
                reader.execute(statement, stream=False)
        outfile = f"/tmp/{mysql['name']}.out"
        with pytest.raises(Exception, match="Access denied"):
            reader.execute(f"SELECT 1 /*!INTO OUTFILE '{outfile}'*/", stream=False)
        assert not os.path.exists(outfile)
        assert reader.query("SELECT count(*) FROM t").rows == [[2]]
    finally:
        admin.dispose()
        reader.dispose()


def test_mysql_output_is_bounded_and_times_out(mysql: dict[str, Any]) -> None:
    executor = ReadOnlyExecutor(mysql["reader"], timeout_s=1)
    try:
        big = executor.query("SELECT seq, REPEAT('x', 2000000) FROM seq_1_to_200"
                             if _is_mariadb(executor) else
                             "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200) "
                             "SELECT i, REPEAT('x', 2000000) FROM n")
        assert big.truncated_by == ["bytes", "cells"] and big.bytes <= executor.limits.max_bytes
        with pytest.raises(TimeoutError):
            executor.query("SELECT SLEEP(5)")
        assert executor.query("SELECT 1").rows == [[1]]  # a dropped connection is not reused
    finally:
        executor.dispose()


def _is_mariadb(executor: ReadOnlyExecutor) -> bool:
    return "mariadb" in executor.execute("SELECT VERSION()").rows[0][0].lower()
