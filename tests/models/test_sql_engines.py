"""`datus.models.sql_engines`: a bare ``postgresql://`` means the same driver on SQLAlchemy 2.0
(Datus-agent pins 2.0.23, whose default is psycopg2) and 2.1 (whose default is psycopg 3)."""

from __future__ import annotations

import importlib.util
import os

import pytest
from sqlalchemy import text

from datus.models import sql_engines
from datus.models.sql_engines import create_read_only_engine, create_store_engine, with_driver

PG_URL = os.environ.get("DQ_TEST_POSTGRES_URL")


@pytest.mark.parametrize(("installed", "driver"), [
    ({"psycopg2"}, "postgresql+psycopg2"),
    ({"psycopg"}, "postgresql+psycopg"),
    ({"psycopg2", "psycopg"}, "postgresql"),  # both: SQLAlchemy's own default stands
])
def test_a_bare_postgres_url_gets_the_installed_driver(monkeypatch: pytest.MonkeyPatch, installed: set[str],
                                                       driver: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(sql_engines.importlib.util, "find_spec",
                        lambda name: real("os") if name in installed else None)
    assert with_driver("postgresql://u@h/db").drivername == driver
    assert with_driver("postgresql+psycopg2://u@h/db").drivername == "postgresql+psycopg2"  # chosen: kept
    assert with_driver("sqlite:///x.db").drivername == "sqlite"


@pytest.mark.skipif(not PG_URL, reason="set DQ_TEST_POSTGRES_URL")
def test_a_bare_postgres_url_connects_on_this_sqlalchemy() -> None:
    bare = with_driver(PG_URL).set(drivername="postgresql")  # type: ignore[arg-type]
    for engine in (create_store_engine(bare, write_option="dq_write"), create_read_only_engine(bare)):
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar() == 1
        finally:
            engine.dispose()
