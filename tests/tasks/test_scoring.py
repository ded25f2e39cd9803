"""Checking and scoring generated SQL (tasks/batch/scoring.py) against real SQLite files, and
against Postgres when ``DQ_TEST_POSTGRES_URL`` is set."""

from __future__ import annotations

import decimal
import hashlib
import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from datus_queue.tasks.batch import scoring
from datus_queue.tasks.batch.scoring import (
    DatabaseUnavailable,
    compare_results,
    dialect_of,
    execute_sql,
    extract_sql,
    schema_text,
    score_item,
    validate_sql,
)

PG_URL = os.environ.get("DQ_TEST_POSTGRES_URL")
FOREVER = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "scoring.db"
    connection = sqlite3.connect(path)
    connection.executescript("""
        CREATE TABLE teams (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT);
        CREATE TABLE players (
            id INTEGER PRIMARY KEY,
            team_id INTEGER NOT NULL REFERENCES teams (id),
            name TEXT NOT NULL,
            height REAL,
            goals INTEGER NOT NULL DEFAULT 0,
            CHECK (goals >= 0)
        );
        CREATE TABLE season_stats (player_id INTEGER REFERENCES players (id), season INTEGER, games INTEGER,
                                   PRIMARY KEY (player_id, season));
        INSERT INTO teams VALUES (1, 'Harbor FC', 'Kiel'), (2, 'Ridge United', 'Graz'), (3, 'Delta Rovers', NULL);
        INSERT INTO players VALUES (1, 1, 'Ana', 1.71, 12), (2, 1, 'Ben', 1.85, 3), (3, 2, 'Caro', 1.66, 7),
                                   (4, 2, 'Dev', 1.90, 7), (5, 3, 'Eli', NULL, 0);
        INSERT INTO season_stats VALUES (1, 2023, 30), (1, 2024, 28), (2, 2024, 12);
    """)
    connection.commit()
    connection.close()
    yield f"sqlite:///{path}"
    scoring.dispose_engines()


def fingerprint(url: str) -> str:
    return hashlib.sha256(Path(url.removeprefix("sqlite:///")).read_bytes()).hexdigest()


# -- extract_sql ------------------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "expected"), [
    ("Here you go:\n```sql\nSELECT name FROM teams;\n```\nIt lists the teams.", "SELECT name FROM teams"),
    ("```SQL\nSELECT 1\n```", "SELECT 1"),
    # a model that corrects itself: the last sql block
    ("First try:\n```sql\nSELECT nme FROM teams\n```\nOops, fixed:\n```sql\nSELECT name FROM teams\n```",
     "SELECT name FROM teams"),
    # a sql block wins over another fence, wherever it is
    ("```sql\nSELECT 2\n```\n```python\nprint('SELECT 3')\n```", "SELECT 2"),
    ("```\nSELECT id\nFROM teams\n\nWHERE id = 1;;\n```", "SELECT id\nFROM teams\n\nWHERE id = 1"),
    ("```postgresql\nSELECT now()\n```", "SELECT now()"),
    ("```sql\nSELECT name FROM teams WHERE", "SELECT name FROM teams WHERE"),  # cut off at max tokens
    ('```json\n{"sql": "SELECT 1 AS one;", "explanation": "one"}\n```', "SELECT 1 AS one"),
    ('{"sql": "SELECT name FROM teams ; "}', "SELECT name FROM teams"),
    ('Answer: {"reasoning": "count rows", "sql": "SELECT COUNT(*) FROM t"} done', "SELECT COUNT(*) FROM t"),
    ('Given {orders} I answer {"sql": "SELECT id FROM orders"} and {more}', "SELECT id FROM orders"),
    ("The query is SELECT name FROM teams WHERE city = 'Kiel; or not'; it returns one row.",
     "SELECT name FROM teams WHERE city = 'Kiel; or not'"),
    ("I would select the teams table.\nSELECT * FROM teams\n\nThis returns all teams.", "SELECT * FROM teams"),
    ("Start with the CTE:\nwith big as (select * from players where goals > 5) select name from big",
     "with big as (select * from players where goals > 5) select name from big"),
    ("Answer with care: WITH RECURSIVE n(x) AS (SELECT 1) SELECT x FROM n;",
     "WITH RECURSIVE n(x) AS (SELECT 1) SELECT x FROM n"),
])
def test_extract_sql(answer: str, expected: str) -> None:
    assert extract_sql(answer) == expected


@pytest.mark.parametrize("answer", ["", "   ", "I cannot answer that without the schema.", '{"answer": 3}',
                                    "```python\nprint(1)\n```"])
def test_extract_sql_none(answer: str) -> None:
    assert extract_sql(answer) is None


# -- validate_sql -----------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
@pytest.mark.parametrize("sql", [
    "SELECT name FROM teams",
    "select t.name, count(*) from teams t join players p on p.team_id = t.id group by t.name order by 2 desc limit 3",
    "SELECT 1 UNION SELECT 2",
    "WITH x AS (SELECT 1 AS a) SELECT a FROM x",
    "(SELECT 1)",
])
def test_validate_sql_accepts_reads(sql: str, dialect: str) -> None:
    assert validate_sql(sql, dialect) is None


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
@pytest.mark.parametrize(("sql", "reason"), [
    ("SELECT name FROM teams WHERE", "could not parse"),
    ("SELECT category, AVG(price) FROM products GROUP category", "could not parse"),
    ("SELEC name FROM teams", "could not parse"),
    ("SELECT 1; SELECT 2", "one statement per query, found 2"),
    ("INSERT INTO teams VALUES (9, 'x', 'y')", "only reads are allowed"),
    ("UPDATE teams SET name = 'x'", "only reads are allowed"),
    ("DELETE FROM teams", "only reads are allowed"),
    ("DROP TABLE teams", "only reads are allowed"),
    ("CREATE TABLE t AS SELECT 1", "only reads are allowed"),
    ("SELECT 1; DROP TABLE teams", "one statement per query"),
    ("", "empty"),
])
def test_validate_sql_refuses(sql: str, reason: str, dialect: str) -> None:
    problem = validate_sql(sql, dialect)
    assert problem is not None and reason in problem


def test_validate_sql_dialect_specifics() -> None:
    assert validate_sql("SELECT a::int FROM t", "postgres") is None
    assert validate_sql("SELECT a::int FROM t", "postgresql") is None  # SQLAlchemy's name works too
    assert "DELETE" in validate_sql("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "postgres")
    assert "EXPLAIN" in validate_sql("EXPLAIN SELECT 1", "postgres")
    assert "VALUES" in validate_sql("VALUES (1)", "sqlite")
    with pytest.raises(ValueError, match="Unknown dialect"):
        validate_sql("SELECT 1", "no-such-dialect")


def test_dialect_of() -> None:
    assert dialect_of("sqlite:///x.db") == "sqlite"
    assert dialect_of("postgresql+psycopg2://u@h/d") == "postgres"


# -- execute_sql ------------------------------------------------------------------------------


def test_execute_returns_rows_and_columns(db: str) -> None:
    result = execute_sql(db, "SELECT name, goals FROM players WHERE goals > 5 ORDER BY name")
    assert result.error is None and not result.truncated and not result.timed_out
    assert result.columns == ["name", "goals"]
    assert result.rows == [("Ana", 12), ("Caro", 7), ("Dev", 7)]
    assert result.elapsed_ms >= 0


def test_execute_truncates_at_max_rows(db: str) -> None:
    result = execute_sql(db, "SELECT id FROM players ORDER BY id", max_rows=2)
    assert result.rows == [(1,), (2,)] and result.truncated
    assert not execute_sql(db, "SELECT id FROM players", max_rows=5).truncated


@pytest.mark.parametrize("sql", [
    "INSERT INTO teams VALUES (9, 'Intruders', 'X')",
    "UPDATE players SET goals = 100",
    "DELETE FROM players",
    "DROP TABLE season_stats",
    "CREATE TABLE extra (id INTEGER)",
    "PRAGMA query_only = OFF",
])
def test_execute_refuses_writes_and_leaves_the_db_unchanged(db: str, sql: str) -> None:
    before = fingerprint(db)
    result = execute_sql(db, sql)
    if sql.startswith("PRAGMA"):  # allowed to run; the write after it must still fail
        result = execute_sql(db, "DELETE FROM players")
    assert result.error is not None and "readonly" in result.error.replace("-", "").replace(" ", "")
    assert fingerprint(db) == before
    assert execute_sql(db, "SELECT COUNT(*) FROM players").rows == [(5,)]


def test_execute_refuses_attach(db: str, tmp_path: Path) -> None:
    result = execute_sql(db, f"ATTACH DATABASE '{tmp_path / 'other.db'}' AS other")
    assert result.error is not None
    assert not (tmp_path / "other.db").exists()


def test_execute_sql_error_is_data_not_an_exception(db: str) -> None:
    result = execute_sql(db, "SELECT nope FROM teams")
    assert result.rows == [] and result.error == "no such column: nope" and not result.timed_out
    assert execute_sql(db, "SELECT * FROM missing_table").error == "no such table: missing_table"


def test_execute_times_out(db: str) -> None:
    # FOREVER never ends: without the deadline this would hang (and the test timeout fail it)
    result = execute_sql(db, FOREVER, timeout_s=1)
    assert result.timed_out and result.error == "the query ran longer than 1s and was stopped"
    assert result.elapsed_ms >= 1000  # stopped at the deadline, not before
    # the pooled connection is usable again, without the old deadline
    assert execute_sql(db, "SELECT COUNT(*) FROM teams").rows == [(3,)]


def test_execute_missing_database_raises(tmp_path: Path) -> None:
    with pytest.raises(DatabaseUnavailable, match="does not exist"):
        execute_sql(f"sqlite:///{tmp_path / 'nowhere.db'}", "SELECT 1")
    assert not (tmp_path / "nowhere.db").exists()  # mode=ro never creates it
    with pytest.raises(DatabaseUnavailable, match="in-memory"):
        execute_sql("sqlite://", "SELECT 1")


def test_engines_are_cached_per_url(db: str) -> None:
    assert scoring._engine(db) is scoring._engine(db)
    scoring.dispose_engines()
    assert execute_sql(db, "SELECT 1").rows == [(1,)]


def test_a_callers_engine_is_guarded_then_given_back_as_it_was(db: str) -> None:
    engine = create_engine(db)  # writable
    try:
        assert execute_sql(engine, "DELETE FROM players").error is not None
        assert execute_sql(engine, "SELECT COUNT(*) FROM players").rows == [(5,)]
        with engine.begin() as connection:  # query_only was switched back off on this connection
            connection.execute(text("UPDATE teams SET city = 'Linz' WHERE id = 3"))
        assert execute_sql(engine, "SELECT city FROM teams WHERE id = 3").rows == [("Linz",)]
    finally:
        engine.dispose()


# -- compare_results --------------------------------------------------------------------------


def test_compare_equal_sets_in_any_order() -> None:
    gold = [("Ana", 12), ("Ben", 3)]
    assert compare_results([("Ben", 3), ("Ana", 12)], gold, "SELECT name, goals FROM players")
    assert compare_results([["Ana", 12], ["Ben", 3]], gold, None)  # lists are rows too


def test_compare_different_results() -> None:
    gold = [("Ana", 12), ("Ben", 3)]
    assert not compare_results([("Ana", 12)], gold, "SELECT 1")
    assert not compare_results([("Ana", 12), ("Ben", 4)], gold, "SELECT 1")
    assert not compare_results([(12, "Ana"), (3, "Ben")], gold, "SELECT 1")  # column order matters
    assert not compare_results([], gold, "SELECT 1")
    assert compare_results([], [], "SELECT 1")


def test_compare_order_matters_only_when_the_gold_orders() -> None:
    gold = [("Ana",), ("Ben",)]
    assert not compare_results([("Ben",), ("Ana",)], gold, "SELECT name FROM p ORDER BY name")
    assert compare_results([("Ana",), ("Ben",)], gold, "select name from p order by name")
    assert not compare_results([("Ben",), ("Ana",)], gold, "WITH x AS (SELECT 1) SELECT name FROM p ORDER BY 1")
    assert not compare_results([("Ben",), ("Ana",)], gold, "SELECT 1 UNION SELECT 2 ORDER BY 1")
    # an ORDER BY inside a subquery does not order the result
    assert compare_results([("Ben",), ("Ana",)], gold, "SELECT name FROM (SELECT name FROM p ORDER BY name) s")
    assert compare_results([("Ben",), ("Ana",)], gold, "SELECT name FROM p")


def test_compare_counts_duplicates() -> None:
    assert not compare_results([(1,), (1,), (2,)], [(1,), (2,), (2,)], "SELECT 1")
    assert not compare_results([(1,), (2,)], [(1,), (1,), (2,)], "SELECT 1")
    assert compare_results([(2,), (1,), (1,)], [(1,), (2,), (1,)], "SELECT 1")


def test_compare_numbers_by_value() -> None:
    assert compare_results([(0.1 + 0.2,)], [(0.3,)], None)
    assert compare_results([(1 / 3,)], [(0.333333,)], None)
    assert compare_results([(3,)], [(3.0,)], None)  # COUNT vs SUM of REAL
    assert compare_results([(decimal.Decimal("12.50"),)], [(12.5,)], None)
    assert compare_results([(123456789.0,)], [(123456789,)], None)
    assert compare_results([(float("nan"), None)], [(float("nan"), None)], None)
    assert not compare_results([(1.0,)], [(1.001,)], None)
    assert not compare_results([(123456789,)], [(123456788,)], None)  # integers stay exact
    assert not compare_results([(None,)], [(0,)], None)
    assert not compare_results([("1",)], [(1,)], None)
    assert compare_results([(b"\x00\x01", memoryview(b"ab"))], [(b"\x00\x01", b"ab")], None)


# -- score_item -------------------------------------------------------------------------------


def test_score_match_ignores_names_and_row_order(db: str) -> None:
    sql = "SELECT p.name AS player, p.goals AS g FROM players p WHERE goals >= 7 ORDER BY g"
    result = score_item(f"```sql\n{sql}\n```", "SELECT name, goals FROM players WHERE goals > 5", db, "sqlite", 5)
    assert result.model_dump() == {"sql": sql, "valid": True, "executed": True, "match": True, "error": None,
                                   "error_code": None, "rows_returned": 3}


@pytest.mark.parametrize(("answer", "gold", "code", "error"), [
    ("I don't know.", "SELECT 1", "no_sql", "no SQL found"),
    ("```sql\nSELECT name FROM teams WHERE\n```", "SELECT 1", "invalid_sql", "could not parse"),
    ("```sql\nDELETE FROM players\n```", "SELECT 1", "invalid_sql", "only reads are allowed"),
    ("```sql\nSELECT salary FROM players\n```", "SELECT 1", "execution_error", "no such column: salary"),
    (f"```sql\n{FOREVER}\n```", "SELECT 1", "timeout", "longer than 1s"),
    ("```sql\nSELECT name FROM teams\n```", "SELECT nme FROM teams", "gold_error",
     "the gold SQL failed: no such column"),
    ("```sql\nSELECT name FROM teams WHERE id < 3\n```", "SELECT name FROM teams", "mismatch",
     "2 row(s) where the gold query returns 3"),
    ("```sql\nSELECT name, city FROM teams\n```", "SELECT name FROM teams", "mismatch", "2 column(s)"),
    ("```sql\nSELECT name FROM teams ORDER BY name DESC\n```", "SELECT name FROM teams ORDER BY name", "mismatch",
     "in another order"),
    ("```sql\nSELECT city FROM teams\n```", "SELECT name FROM teams", "mismatch", "different values"),
])
def test_score_outcomes(db: str, answer: str, gold: str, code: str, error: str) -> None:
    result = score_item(answer, gold, db, "sqlite", timeout_s=1)
    assert result.error_code == code
    assert result.error is not None and error in result.error
    assert result.valid is (code not in ("no_sql", "invalid_sql"))
    assert result.executed is (code in ("gold_error", "mismatch"))
    assert result.match is (False if code == "mismatch" else None)


def test_score_without_gold_or_database(db: str) -> None:
    no_gold = score_item('{"sql": "SELECT name FROM teams"}', None, db)  # the dialect comes from the URL
    assert (no_gold.valid, no_gold.executed, no_gold.match, no_gold.rows_returned, no_gold.error_code) == (
        True, True, None, 3, None)
    no_db = score_item("SELECT name FROM teams", "SELECT name FROM teams", None, "sqlite")
    assert (no_db.valid, no_db.executed, no_db.match, no_db.error_code) == (True, False, None, None)


def test_score_missing_database_raises(tmp_path: Path) -> None:
    with pytest.raises(DatabaseUnavailable):
        score_item("SELECT 1", "SELECT 1", f"sqlite:///{tmp_path / 'gone.db'}", "sqlite")


# -- schema_text ------------------------------------------------------------------------------


def test_schema_text_describes_tables_columns_and_keys(db: str) -> None:
    schema = schema_text(db)
    assert schema.index("CREATE TABLE players") < schema.index("CREATE TABLE season_stats") < schema.index(
        "CREATE TABLE teams")
    assert "  id INTEGER PRIMARY KEY,\n  team_id INTEGER NOT NULL," in schema
    assert "  height REAL,\n" in schema
    assert "FOREIGN KEY (team_id) REFERENCES teams (id)" in schema
    assert "PRIMARY KEY (player_id, season)" in schema
    assert "  CHECK (goals >= 0)\n);" in schema
    assert "not shown" not in schema
    assert schema_text(db, max_tokens=10_000) == schema


def test_schema_text_lists_views_after_tables_and_quotes_odd_names(tmp_path: Path) -> None:
    path = tmp_path / "views.db"
    connection = sqlite3.connect(path)
    connection.executescript("""
        CREATE TABLE "order lines" ("line id" INTEGER PRIMARY KEY, amount REAL);
        CREATE VIEW big_lines AS SELECT "line id", amount FROM "order lines" WHERE amount > 100;
    """)
    connection.close()
    try:
        schema = schema_text(f"sqlite:///{path}")
    finally:
        scoring.dispose_engines()
    assert schema == (
        'CREATE TABLE "order lines" (\n  "line id" INTEGER PRIMARY KEY,\n  amount REAL\n);\n\n'
        'CREATE VIEW big_lines (\n  "line id" INTEGER,\n  amount REAL\n);'
    )


def test_schema_text_trims_tables_then_columns_from_the_end(db: str) -> None:
    full = schema_text(db)
    def words(text: str) -> int:  # a counter that is not the default one
        return len(text.split())

    budget = words(full) - 5
    trimmed = schema_text(db, max_tokens=budget, token_counter=words)
    assert words(trimmed) <= budget
    assert "CREATE TABLE players" in trimmed and "CREATE TABLE teams" not in trimmed
    assert "-- 1 more table(s) not shown: teams" in trimmed

    tiny = schema_text(db, max_tokens=25, token_counter=words)
    assert words(tiny) <= 25
    assert tiny.startswith("CREATE TABLE players (\n  id INTEGER PRIMARY KEY\n  -- 4 more column(s) not shown\n);")
    assert "-- 2 more table(s) not shown: season_stats, teams" in tiny

    nothing = schema_text(db, max_tokens=1)
    assert nothing == "-- 3 more table(s) not shown: players, season_stats, teams"


# -- Postgres ---------------------------------------------------------------------------------


@pytest.fixture
def pg_tables() -> Iterator[tuple[str, str]]:
    if not PG_URL:
        pytest.skip("set DQ_TEST_POSTGRES_URL to run the Postgres cases")
    table = f"dq_score_{uuid.uuid4().hex[:10]}"
    url = PG_URL
    admin = create_engine(scoring._engine(url).url)  # the same driver, writable
    with admin.begin() as connection:
        connection.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                                "price NUMERIC(10, 2))"))
        connection.execute(text(f"INSERT INTO {table} VALUES (1, 'kettle', 24.50), (2, 'pan', 31.00), "
                                "(3, 'mug', 6.25)"))
    try:
        yield url, table
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP TABLE IF EXISTS {table}"))
        admin.dispose()
        scoring.dispose_engines()


def test_postgres_execute_and_score(pg_tables: tuple[str, str]) -> None:
    url, table = pg_tables
    result = execute_sql(url, f"SELECT name, price FROM {table} ORDER BY id")
    assert result.error is None and result.columns == ["name", "price"]
    assert result.rows == [("kettle", decimal.Decimal("24.50")), ("pan", decimal.Decimal("31.00")),
                           ("mug", decimal.Decimal("6.25"))]
    assert execute_sql(url, f"SELECT id FROM {table} ORDER BY id", max_rows=2).truncated
    assert "does not exist" in execute_sql(url, "SELECT * FROM no_such_table_here").error

    gold = f"SELECT name, price FROM {table} WHERE price > 10"
    match = score_item(f"```sql\nSELECT name, price::float FROM {table} WHERE price >= 24.5\n```", gold, url)
    assert match.match is True and match.error_code is None and match.rows_returned == 2
    mismatch = score_item(f"SELECT name, price FROM {table}", gold, url, "postgresql")
    assert mismatch.error_code == "mismatch"


def test_postgres_is_read_only(pg_tables: tuple[str, str]) -> None:
    url, table = pg_tables
    for sql in (f"DELETE FROM {table}", f"UPDATE {table} SET name = 'x'",
                f"WITH d AS (DELETE FROM {table} RETURNING *) SELECT * FROM d"):
        assert execute_sql(url, sql).error is not None
    assert execute_sql(url, f"SELECT COUNT(*) FROM {table}").rows == [(3,)]
    assert score_item(f"```sql\nDELETE FROM {table}\n```", None, url).error_code == "invalid_sql"


def running_queries(url: str, fragment: str) -> list[str]:
    """The other sessions' statements still running on the server that contain ``fragment``."""
    engine = create_engine(scoring._engine(url).url)  # the same driver
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(
                "SELECT query FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid() "
                "AND strpos(query, :fragment) > 0"), {"fragment": fragment}).scalars())
    finally:
        engine.dispose()


def test_postgres_timeout(pg_tables: tuple[str, str]) -> None:
    url, table = pg_tables
    sleep = f"SELECT pg_sleep(30) FROM {table} LIMIT 1"  # this test's own table: other runs' sleeps differ
    result = execute_sql(url, sleep, timeout_s=1)
    assert result.timed_out and "longer than 1s" in result.error  # else it returns a row after 30 s
    assert result.elapsed_ms >= 1000
    assert not running_queries(url, sleep)  # stopped on the server, not just given up on by the client
    assert score_item(f"```sql\n{FOREVER}\n```", "SELECT 1", url, timeout_s=1).error_code == "timeout"
    assert execute_sql(url, "SELECT 1").rows == [(1,)]  # the connection recovered


def test_postgres_schema_text(pg_tables: tuple[str, str]) -> None:
    url, table = pg_tables
    schema = schema_text(url)
    expected = f"CREATE TABLE {table} (\n  id INTEGER PRIMARY KEY,\n  name TEXT NOT NULL,\n  price NUMERIC(10, 2)\n);"
    assert expected in schema
