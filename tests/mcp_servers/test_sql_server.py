"""The shipped read-only SQL server, as a real process over stdio (and streamable HTTP),
on a temporary SQLite file, and on Postgres when DQ_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from datus.mcp_servers.sql_server import ReadOnlyDatabase, ReadOnlyViolation, check_read_only
from datus.models.mcp_utils import (
    MCPConnectError,
    MCPConnection,
    MCPServerStdio,
    MCPServerStreamableHttp,
    multiple_mcp_servers,
)
from tests.mcp_servers.conftest import count_rows, http_server, sql_server


@contextlib.asynccontextmanager
async def connected(spec: MCPServerStdio | MCPServerStreamableHttp) -> AsyncIterator[MCPConnection]:
    async with multiple_mcp_servers({"sql": spec}) as servers:
        yield servers["sql"]


async def read(conn: MCPConnection, query: str) -> dict[str, Any]:
    result = await conn.call_tool("read_query", {"query": query})
    assert not result.is_error, result.text
    return json.loads(result.text)


async def test_lists_describes_and_reads(shop_db: Path) -> None:
    async with connected(sql_server(shop_db)) as sql:
        assert [tool.name for tool in await sql.list_tools()] == ["list_tables", "describe_table", "read_query"]

        listed = await sql.call_tool("list_tables")
        assert json.loads(listed.text) == {"tables": ["customers", "orders"], "views": ["big_orders"]}

        described = json.loads((await sql.call_tool("describe_table", {"table_name": "orders"})).text)
        columns = {column["name"]: column for column in described["columns"]}
        assert columns["id"]["primary_key"] and not columns["amount"]["primary_key"]
        assert columns["amount"]["type"].startswith("NUMERIC") and columns["amount"]["nullable"] is False
        assert described["foreign_keys"] == [{"columns": ["customer_id"], "references": "customers(id)"}]
        assert described["create_statement"].startswith("CREATE TABLE orders")

        answer = await read(sql, "SELECT city, count(*) AS n FROM customers GROUP BY city ORDER BY city")
        assert answer == {"columns": ["city", "n"], "rows": [["Berlin", 15], ["Lisbon", 15]], "row_count": 2,
                          "truncated": False}
        assert (await read(sql, "WITH c AS (SELECT 1 AS one) SELECT one FROM c"))["rows"] == [[1]]
        assert (await read(sql, "VALUES (1, 'a'), (2, 'b')"))["row_count"] == 2
        assert (await read(sql, "EXPLAIN QUERY PLAN SELECT * FROM orders WHERE id = 3"))["row_count"] >= 1
        assert (await read(sql, "SELECT '100%' AS pct, ':name' AS colon"))["rows"] == [["100%", ":name"]]


WRITES = [
    "INSERT INTO customers (name) VALUES ('mallory')",
    "REPLACE INTO customers (id, name) VALUES (1, 'mallory')",
    "UPDATE customers SET name = 'mallory'",
    "DELETE FROM orders",
    "DROP TABLE orders",
    "CREATE TABLE evil (a INT)",
    "ATTACH DATABASE '{tmp}/evil.db' AS evil",
    "PRAGMA user_version = 7",
    "PRAGMA journal_mode = DELETE",
    "VACUUM",
    "SELECT 1; DROP TABLE orders",
    "SELECT * FROM customers;DELETE FROM customers;",
    "BEGIN; DELETE FROM orders; COMMIT",
    "WITH gone AS (DELETE FROM orders RETURNING *) SELECT * FROM gone",
    "SELECT * INTO stolen FROM customers",
    "EXPLAIN ANALYZE DELETE FROM orders",
    "EXPLAIN DELETE FROM orders",
]


async def test_refuses_every_write(shop_db: Path, tmp_path: Path) -> None:
    async with connected(sql_server(shop_db)) as sql:
        for statement in WRITES:
            result = await sql.call_tool("read_query", {"query": statement.format(tmp=tmp_path)})
            assert result.is_error and "refused" in result.text, (statement, result.text)
    assert count_rows(shop_db, "customers") == 30 and count_rows(shop_db, "orders") == 30
    with contextlib.closing(sqlite3.connect(shop_db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"customers", "orders", "big_orders"} <= names and not names & {"evil", "stolen"}
    assert not (tmp_path / "evil.db").exists()


def test_the_database_refuses_writes_even_past_the_parser(shop_db: Path, tmp_path: Path) -> None:
    db = ReadOnlyDatabase(f"sqlite:///{shop_db}")
    try:
        for statement in ("DELETE FROM orders", "PRAGMA user_version = 7", "CREATE TABLE evil (a INT)"):
            with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
                db.execute(statement)
        with pytest.raises(sqlite3.OperationalError):
            db.execute(f"ATTACH DATABASE '{tmp_path / 'evil.db'}' AS evil")
    finally:
        db.dispose()
    assert count_rows(shop_db, "orders") == 30 and not (tmp_path / "evil.db").exists()


@pytest.mark.parametrize("query", ["SELECT 1", "select * from t -- ; drop table t", "(SELECT 1)",
                                   "SELECT 1 UNION ALL SELECT 2", "EXPLAIN (FORMAT JSON) SELECT 1"])
def test_reads_pass_the_parser(query: str) -> None:
    check_read_only(query, "postgres")


@pytest.mark.parametrize("query", ["", " ; ", "selec 1", "SELECT 'open", "SELECT * FROM t FOR UPDATE",
                                   "COPY t TO '/tmp/out'", "SHOW tables", "EXPLAIN /* hidden */ ANALYZE SELECT 1"])
def test_everything_else_fails_the_parser(query: str) -> None:
    with pytest.raises(ReadOnlyViolation):
        check_read_only(query, "postgres")


async def test_caps_rows(shop_db: Path) -> None:
    async with connected(sql_server(shop_db, "--max-rows", "5")) as sql:
        capped = await read(sql, "SELECT id FROM customers ORDER BY id")
        assert capped["rows"] == [[1], [2], [3], [4], [5]] and capped["row_count"] == 5 and capped["truncated"]
        exact = await read(sql, "SELECT id FROM customers WHERE id <= 5")
        assert exact["row_count"] == 5 and not exact["truncated"]


async def test_bad_sql_and_unknown_tables_are_readable_tool_errors(shop_db: Path) -> None:
    async with connected(sql_server(shop_db)) as sql:
        typo = await sql.call_tool("read_query", {"query": "SELEC name FROM customers"})
        assert typo.is_error and "could not parse the SQL" in typo.text and "line 1" in typo.text
        missing = await sql.call_tool("read_query", {"query": "SELECT * FROM invoices"})
        assert missing.is_error and "no such table: invoices" in missing.text
        described = await sql.call_tool("describe_table", {"table_name": "invoices"})
        assert described.is_error and "unknown table 'invoices'" in described.text and "customers" in described.text
        no_argument = await sql.call_tool("read_query", {})
        assert no_argument.is_error and "query" in no_argument.text


async def test_stops_a_query_at_its_time_limit(shop_db: Path) -> None:
    endless = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n"
    async with connected(sql_server(shop_db, "--timeout-s", "0.5")) as sql:
        result = await sql.call_tool("read_query", {"query": endless})
        assert result.is_error and "longer than 0.5s" in result.text
        assert (await read(sql, "SELECT count(*) FROM orders"))["rows"] == [[30]]  # still serving


async def test_takes_the_url_from_the_environment(shop_db: Path) -> None:
    spec = MCPServerStdio(command=sys.executable, args=["-m", "datus.mcp_servers.sql_server"],
                          env={"DQ_SQL_URL": f"sqlite:///{shop_db}"})
    async with connected(spec) as sql:
        assert (await read(sql, "SELECT count(*) FROM customers"))["rows"] == [[30]]


async def test_a_missing_database_stops_the_server_at_start(tmp_path: Path) -> None:
    with pytest.raises(MCPConnectError, match="'sql' failed to start: exited at start.*does not exist"):
        async with connected(sql_server(tmp_path / "missing.db")):
            pass
    assert not (tmp_path / "missing.db").exists()


async def test_serves_streamable_http(shop_db: Path) -> None:
    command = [sys.executable, "-m", "datus.mcp_servers.sql_server", "--url", f"sqlite:///{shop_db}",
               "--transport", "streamable-http"]
    with http_server(*command) as url:
        async with connected(MCPServerStreamableHttp(url=url)) as sql:
            assert (await read(sql, "SELECT name FROM customers WHERE id = 2"))["rows"] == [["customer 1"]]
            refused = await sql.call_tool("read_query", {"query": "DELETE FROM customers"})
            assert refused.is_error and "refused" in refused.text
    assert count_rows(shop_db, "customers") == 30


# ---------------------------------------------------------------- Postgres

POSTGRES_URL = os.environ.get("DQ_TEST_POSTGRES_URL")
needs_postgres = pytest.mark.skipif(not POSTGRES_URL, reason="set DQ_TEST_POSTGRES_URL to run against Postgres")


@pytest.fixture
def pg_table() -> Any:
    assert POSTGRES_URL
    url = ReadOnlyDatabase(POSTGRES_URL).url  # with the driver that is installed
    engine = create_engine(url)
    table = f"dq_mcp_{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (id SERIAL PRIMARY KEY, label TEXT NOT NULL, price NUMERIC(8, 2))"))
        conn.execute(text(f"INSERT INTO {table} (label, price) "
                          "SELECT 'item ' || g, g * 1.25 FROM generate_series(1, 12) g"))
    try:
        yield table
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()


@needs_postgres
async def test_postgres_reads_and_refuses_writes(pg_table: str) -> None:
    assert POSTGRES_URL
    async with connected(sql_server(POSTGRES_URL, "--max-rows", "10", "--timeout-s", "1")) as sql:
        assert pg_table in json.loads((await sql.call_tool("list_tables")).text)["tables"]
        described = json.loads((await sql.call_tool("describe_table", {"table_name": pg_table})).text)
        columns = {column["name"]: column for column in described["columns"]}
        assert columns["id"]["primary_key"] and columns["label"]["nullable"] is False
        assert columns["price"]["type"] == "NUMERIC(8, 2)"

        answer = await read(sql, f"SELECT label, price::float AS p, price FROM {pg_table} ORDER BY id")
        assert answer["row_count"] == 10 and answer["truncated"] and answer["rows"][0] == ["item 1", 1.25, 1.25]
        # Rows stream from a server-side cursor: fetching all 100M first would pass the 1s limit.
        huge = await read(sql, "SELECT a * b FROM generate_series(1, 10000) a, generate_series(1, 10000) b")
        assert huge["rows"][:2] == [[1], [2]] and huge["truncated"]
        plan = await read(sql, f"EXPLAIN (FORMAT TEXT) SELECT * FROM {pg_table} WHERE id = 3")
        assert plan["columns"] == ["QUERY PLAN"] and plan["row_count"] >= 1

        for statement in (f"DELETE FROM {pg_table}", f"SELECT 1; DROP TABLE {pg_table}",
                          f"WITH d AS (DELETE FROM {pg_table} RETURNING *) SELECT * FROM d"):
            result = await sql.call_tool("read_query", {"query": statement})
            assert result.is_error and "refused" in result.text, statement
        # A SELECT the parser lets through but that writes: the read-only transaction stops it.
        sneaky = await sql.call_tool("read_query", {"query": f"SELECT nextval('{pg_table}_id_seq')"})
        assert sneaky.is_error and "read-only transaction" in sneaky.text
        slow = await sql.call_tool("read_query", {"query": "SELECT pg_sleep(30)"})
        assert slow.is_error and "statement timeout" in slow.text
    assert (await _pg_count(pg_table)) == 12


@needs_postgres
def test_postgres_refuses_writes_even_past_the_parser(pg_table: str) -> None:
    assert POSTGRES_URL
    db = ReadOnlyDatabase(POSTGRES_URL)
    try:
        with pytest.raises(Exception, match="read-only transaction"):
            db.execute(f"DELETE FROM {pg_table}", stream=False)
        with pytest.raises(Exception, match="syntax error"):  # a server-side cursor takes reads only
            db.execute(f"DELETE FROM {pg_table}")
        assert db.execute(f"SELECT count(*) FROM {pg_table}")["rows"] == [[12]]
    finally:
        db.dispose()


async def _pg_count(table: str) -> int:
    assert POSTGRES_URL
    db = ReadOnlyDatabase(POSTGRES_URL)
    try:
        return db.execute(f"SELECT count(*) FROM {table}")["rows"][0][0]
    finally:
        db.dispose()
