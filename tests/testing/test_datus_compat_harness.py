"""The pieces of ops/datus_compat (the harness running Datus-agent's model tests) that need no
Datus source: the SSB database, the stand-in database tools, the agent.yml rewrite, the
report read from a real pytest run. The harness itself is run by hand (its README)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

HARNESS = Path(__file__).resolve().parents[2] / "ops" / "datus_compat"


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    # the harness is a script directory: its modules import each other by plain name
    sys.path.insert(0, str(HARNESS))
    try:
        yield
    finally:
        sys.path.remove(str(HARNESS))


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ssb_db(tmp_path_factory: pytest.TempPathFactory, harness: None) -> Path:
    from ssb import build_ssb

    return build_ssb(tmp_path_factory.mktemp("ssb") / "SSB.db")


def test_ssb_has_the_five_tables_and_answers_the_tests_questions(ssb_db: Path) -> None:
    with sqlite3.connect(ssb_db) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid")]
        assert tables == ["customer", "supplier", "part", "date", "lineorder"]
        revenue_1993 = db.execute(
            "SELECT SUM(lo_extendedprice * lo_discount) FROM lineorder JOIN date ON lo_orderdate = d_datekey "
            "WHERE d_year = 1993 AND lo_discount BETWEEN 1 AND 3 AND lo_quantity < 25").fetchone()[0]
        regions = db.execute("SELECT COUNT(DISTINCT c_region) FROM customer").fetchone()[0]
        orphans = db.execute("SELECT COUNT(*) FROM lineorder LEFT JOIN customer ON lo_custkey = c_custkey "
                             "WHERE c_custkey IS NULL").fetchone()[0]
    assert revenue_1993 > 0 and regions == 5 and orphans == 0


def test_ssb_is_deterministic(tmp_path: Path, harness: None) -> None:
    from ssb import build_ssb

    dumps = []
    for name in ("a.db", "b.db"):
        with sqlite3.connect(build_ssb(tmp_path / name)) as db:
            dumps.append(list(db.iterdump()))
    assert dumps[0] == dumps[1]


class _Config:
    """What the stand-in tools read of the stand-in loader's config."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def namespace_config(self) -> dict[str, Any]:
        return {"type": "sqlite", "name": "SSB", "uri": self.uri}


def test_standin_tools_answer_in_datus_shapes(ssb_db: Path) -> None:
    database = load(HARNESS / "standins" / "datus" / "tools" / "func_tool" / "database.py", "standin_database")
    tools = {tool.name: tool for tool in database.db_function_tools(_Config(str(ssb_db)))}
    assert list(tools) == ["list_tables", "describe_table", "search_table", "read_query", "get_table_ddl"]
    assert all(set(tool.params_json_schema["required"]) == set(tool.params_json_schema["properties"])
               for tool in tools.values())

    def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return asyncio.run(tools[name].on_invoke_tool(None, json.dumps(arguments)))

    listed = call("list_tables", {"catalog": "", "database": None, "schema_name": "", "include_views": True})
    assert listed == {"success": 1, "error": None, "result": [{"type": "table", "name": name} for name in
                                                             ("customer", "supplier", "part", "date", "lineorder")]}
    columns = call("describe_table", {"table_name": "customer"})["result"]["columns"]
    assert columns[0] == {"cid": 0, "name": "c_custkey", "type": "INTEGER", "notnull": 0, "dflt_value": None, "pk": 1}
    many = call("read_query", {"sql": "SELECT d_datekey FROM date"})["result"]
    assert (many["original_rows"], many["is_compressed"], many["compression_type"]) == (2557, True, "rows")
    assert many["compressed_data"].splitlines()[:2] == ["index,d_datekey", "0,19920101"]
    assert many["compressed_data"].splitlines()[11] == "..."
    few = call("read_query", {"sql": "SELECT COUNT(*) AS n FROM customer"})["result"]
    assert few["compressed_data"] == "index,n\n0,60" and few["compression_type"] == "none"
    refused = call("read_query", {"sql": "DELETE FROM customer"})
    assert refused["success"] == 0 and "readonly" in refused["error"]
    ddl = call("get_table_ddl", {"table_name": "date"})["result"]
    assert ddl["identifier"] == "SSB.date" and ddl["definition"].startswith("CREATE TABLE date")
    assert call("search_table", {"query_text": "revenue"}) == {
        "success": 0, "error": "Table search is unavailable because schema storage is not ready.", "result": None}


def test_point_at_fakes_rewrites_base_urls_only(tmp_path: Path, harness: None) -> None:
    from tree import STANDINS, point_at_fakes

    agent_yml = tmp_path / "agent.yml"
    agent_yml.write_text((STANDINS / "tests" / "conf" / "agent.yml").read_text())
    before = yaml.safe_load(agent_yml.read_text())
    pointed = point_at_fakes(agent_yml, "http://127.0.0.1:9")
    after = yaml.safe_load(agent_yml.read_text())
    assert pointed["anthropic"] == "http://127.0.0.1:9" and pointed["gemini-2.5"] == "http://127.0.0.1:9/v1beta"
    assert pointed["qwen"] == pointed["kimi-k2"] == "http://127.0.0.1:9/v1"
    for name, model in before["agent"]["models"].items():
        assert after["agent"]["models"][name] == {**model, "base_url": pointed[name]}
    assert after["agent"]["namespace"] == before["agent"]["namespace"]


def test_report_reads_a_real_pytest_run(tmp_path: Path, harness: None) -> None:
    from report import format_report, logged_failures, read_junit

    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_other_models.py").write_text(
        "import logging, pytest\n"
        "class TestKimiModel:\n"
        "    def test_initialization(self):\n"
        "        assert 'http://fake/v1' == 'https://api.moonshot.cn/v1'\n"
        "    def test_tokens(self):\n"
        "        logging.getLogger('t').info('\\u274c FAILURE: Token consumption fix needs work')\n"
        "    def test_skip(self):\n"
        "        pytest.skip('no key')\n"
        "    @pytest.fixture\n"
        "    def broken(self):\n"
        "        raise RuntimeError('setup broke')\n"
        "    def test_error(self, broken):\n"
        "        pass\n")
    log = tmp_path / "pytest.log"
    with log.open("w") as out:
        subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests", "-o", "log_cli=true",
                        "-o", "log_cli_level=INFO", f"--junitxml={tmp_path / 'junit.xml'}"],
                       cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, check=False)
    outcomes = {outcome.test_id: outcome for outcome in read_junit(tmp_path / "junit.xml")}
    base = "tests/test_other_models.py::TestKimiModel::"
    assert {test_id.removeprefix(base): outcome.status for test_id, outcome in outcomes.items()} == {
        "test_initialization": "failed", "test_tokens": "passed", "test_skip": "skipped", "test_error": "error"}
    assert outcomes[base + "test_skip"].message.endswith("no key")
    logged = logged_failures(log)
    assert logged == [(base + "test_tokens", logged[0][1])] and "Token consumption" in logged[0][1]
    text = format_report("standalone", list(outcomes.values()), {"python": sys.executable}, {}, logged)
    assert "tests/test_other_models.py        1        1        1        1" in text
    assert "[harness: asserts base_url == https://api.moonshot.cn/v1" in text
