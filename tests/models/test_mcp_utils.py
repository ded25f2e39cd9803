"""`datus.models.mcp_utils` against real MCP server processes: the shipped SQL server, the
test server in tests/fakes, and the reference `mcp-server-sqlite` (mcp<2) from PyPI."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import sys
from pathlib import Path

import anyio
import pytest

from datus.models.config import AgentConfig, ConfigError
from datus.models.mcp import sdk
from datus.models.mcp_utils import (
    MCPConnectError,
    MCPConnectionLostError,
    MCPServerStdio,
    MCPServerStreamableHttp,
    MCPToolNotFoundError,
    mcp_server_from_config,
    multiple_mcp_servers,
    resolve_mcp_servers,
)
from tests.mcp_servers.conftest import (
    FAKE_SERVER,
    build_reference_sqlite_server,
    fake_server,
    free_port,
    http_server,
    make_shop_db,
    pid_alive,
    sql_server,
)

EXITS_AT_START = MCPServerStdio(command=sys.executable,
                                args=["-c", "import sys; sys.exit('config error: FOO_TOKEN is not set')"])


# ---------------------------------------------------------------- specs and config


def test_spec_reprs_hide_secrets() -> None:
    stdio = MCPServerStdio(command="mcp-server-snowflake", env={"SNOWFLAKE_PASSWORD": "hunter2"})
    http = MCPServerStreamableHttp(url="https://bob:s3cret@mcp.example.com/mcp",
                                   headers={"Authorization": "Bearer tok"})
    for shown in (repr(stdio), str(stdio), repr(http), str(http)):
        assert "hunter2" not in shown and "s3cret" not in shown and "Bearer" not in shown
    assert "SNOWFLAKE_PASSWORD" in repr(stdio) and "Authorization" in repr(http)
    assert stdio.env == {"SNOWFLAKE_PASSWORD": "hunter2"}  # hidden from reprs, not lost
    with pytest.raises(ValueError, match="enviroment"):
        MCPServerStdio(command="x", enviroment={})  # type: ignore[call-arg]


def test_server_from_config_substitutes_env_and_names_bad_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DQ_TEST_SF_PASSWORD", "pw")
    monkeypatch.setenv("DQ_TEST_MCP_TOKEN", "tok")
    stdio = mcp_server_from_config("snowflake", {
        "command": "mcp-server-snowflake", "args": ["--account", "acme"],
        "env": {"SNOWFLAKE_PASSWORD": "${DQ_TEST_SF_PASSWORD}", "SNOWFLAKE_ACCOUNT": "${ACCT:-acme}"},
    })
    assert isinstance(stdio, MCPServerStdio) and stdio.name == "snowflake"
    assert stdio.args == ["--account", "acme"]
    assert stdio.env == {"SNOWFLAKE_PASSWORD": "pw", "SNOWFLAKE_ACCOUNT": "acme"}
    http = mcp_server_from_config("remote", {"url": "http://h/mcp",
                                             "headers": {"Authorization": "Bearer ${DQ_TEST_MCP_TOKEN}"}})
    assert isinstance(http, MCPServerStreamableHttp) and http.headers == {"Authorization": "Bearer tok"}

    monkeypatch.delenv("DQ_TEST_SF_PASSWORD")
    with pytest.raises(ConfigError, match="mcp_servers.snowflake needs environment variable.*DQ_TEST_SF_PASSWORD"):
        mcp_server_from_config("snowflake", {"command": "x", "env": {"P": "${DQ_TEST_SF_PASSWORD}"}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'arg' \(did you mean 'args'\?\)"):
        mcp_server_from_config("snowflake", {"command": "x", "arg": ["y"]})
    with pytest.raises(ConfigError, match="needs 'command'.*or 'url'"):
        mcp_server_from_config("nothing", {"env": {}})
    with pytest.raises(ConfigError, match="unknown key.*'url'"):
        mcp_server_from_config("both", {"command": "x", "url": "http://h"})


def test_a_variable_in_a_stdio_servers_command_line_is_refused_pointing_at_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ps`` shows every process's arguments: a ``${VAR}`` (a secret, as a rule) goes in ``env:``."""
    monkeypatch.setenv("DQ_TEST_SF_PASSWORD", "pw-never-in-argv")
    for entry, place in (({"command": "srv", "args": ["--password", "${DQ_TEST_SF_PASSWORD}"]}, r"args\[1\]"),
                         ({"command": "srv", "args": ["--dsn=u:${DQ_TEST_SF_PASSWORD}@h"]}, r"args\[0\]"),
                         ({"command": "${DQ_TEST_SF_PASSWORD}/srv"}, "command")):
        with pytest.raises(ConfigError, match=rf"mcp_servers\.sf\.{place}: \$\{{DQ_TEST_SF_PASSWORD\}} is not "
                                              r"substituted.*ps.*env: \{DQ_TEST_SF_PASSWORD") as refused:
            mcp_server_from_config("sf", entry)
        assert "pw-never-in-argv" not in str(refused.value)
    # in env (and an HTTP server's url and headers) it is substituted
    spec = mcp_server_from_config("sf", {"command": "srv", "env": {"P": "${DQ_TEST_SF_PASSWORD}"}})
    assert isinstance(spec, MCPServerStdio) and spec.env == {"P": "pw-never-in-argv"} and spec.args == []


def test_resolve_accepts_dicts_names_and_none() -> None:
    config = AgentConfig.from_dict({"agent": {"mcp_servers": {
        "sql": {"command": "python", "args": ["-m", "datus.mcp_servers.sql_server"]},
        "remote": {"type": "streamable_http", "url": "http://h/mcp"},
    }}})
    assert resolve_mcp_servers(None, config) == {}
    by_name = resolve_mcp_servers(["sql", "remote"], config)
    assert list(by_name) == ["sql", "remote"] and isinstance(by_name["remote"], MCPServerStreamableHttp)
    direct = resolve_mcp_servers({"snowflake": MCPServerStdio(command="mcp-server-snowflake")})
    assert direct["snowflake"].name == "snowflake"
    with pytest.raises(ConfigError, match="unknown MCP server 'warehouse'; configured MCP servers: remote, sql"):
        resolve_mcp_servers(["sql", "warehouse"], config)
    with pytest.raises(ConfigError, match="unknown MCP server 'sql'.*none"):
        resolve_mcp_servers(["sql"])
    with pytest.raises(ConfigError, match="name"):
        resolve_mcp_servers([MCPServerStdio(command="x")])


def test_errors_survive_pickling() -> None:
    error = MCPConnectError("MCP server 'a' failed to start: boom", server="a", failures={"a": "boom"})
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is MCPConnectError and copy.server == "a" and copy.failures == {"a": "boom"}
    assert str(copy) == str(error) and copy.code == error.code


# ---------------------------------------------------------------- connecting


# Starts the fake MCP server only once every server of the group has been started: started one
# after the other, the first would wait for the second and never answer its handshake.
RENDEZVOUS = """
import os, pathlib, runpy, sys, time
here, expected, server = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
(here / str(os.getpid())).touch()
deadline = time.monotonic() + 120
while len(list(here.iterdir())) < expected:
    if time.monotonic() > deadline:
        sys.exit("the other servers never started")
    time.sleep(0.02)
sys.argv = [server]
runpy.run_path(server, run_name="__main__")
"""


def rendezvous_server(here: Path, expected: int) -> MCPServerStdio:
    here.mkdir(exist_ok=True)
    return MCPServerStdio(command=sys.executable, args=["-c", RENDEZVOUS, str(here), str(expected), str(FAKE_SERVER)])


async def test_connects_in_parallel_and_calls_tools_on_each(tmp_path: Path) -> None:
    db = make_shop_db(tmp_path / "shop.db")
    started = tmp_path / "started"
    async with multiple_mcp_servers({"sql": sql_server(db), "slow1": rendezvous_server(started, 2),
                                     "slow2": rendezvous_server(started, 2)}, strict=False) as servers:
        # both slow servers were running before either answered: they were started side by side
        assert set(servers) == {"sql", "slow1", "slow2"} and servers.failed == {}
        assert len(list(started.iterdir())) == 2  # once each: no retry was needed
        sql_answer = await servers["sql"].call_tool("read_query", {"query": "SELECT count(*) FROM orders"})
        assert json.loads(sql_answer.text)["rows"] == [[30]]
        echo = await servers["slow1"].call_tool("echo", {"text": "hello"})
        assert (echo.text, echo.is_error, echo.server, echo.tool) == ("hello", False, "slow1", "echo")


async def test_same_tool_names_get_server_prefixes(tmp_path: Path) -> None:
    eu = make_shop_db(tmp_path / "eu.db", rows=3)
    us = make_shop_db(tmp_path / "us.db", rows=7)
    async with multiple_mcp_servers({"eu": sql_server(eu), "us": sql_server(us), "tools": fake_server()}) as servers:
        tools = {tool.exposed_name: tool for tool in await servers.tools()}
        assert {"eu__read_query", "us__read_query", "eu__list_tables", "echo", "pid"} <= set(tools)
        assert "read_query" not in tools
        assert (tools["us__read_query"].server, tools["us__read_query"].name) == ("us", "read_query")
        assert servers.route("eu__describe_table") == ("eu", "describe_table")
        for exposed, rows in (("eu__read_query", 3), ("us__read_query", 7)):
            answer = await servers.call_tool(exposed, {"query": "SELECT count(*) FROM customers"})
            assert json.loads(answer.text)["rows"] == [[rows]]
        assert (await servers.call_tool("echo", {"text": "x"})).text == "x"
        with pytest.raises(MCPToolNotFoundError, match="no MCP tool named 'read_query'.*eu__read_query"):
            await servers.call_tool("read_query", {"query": "SELECT 1"})


async def test_tool_errors_are_results_not_exceptions() -> None:
    async with multiple_mcp_servers({"tools": fake_server()}) as servers:
        tools = servers["tools"]
        failed = await tools.call_tool("fail", {"message": "the warehouse is closed"})
        assert failed.is_error and "the warehouse is closed" in failed.text
        unknown = await tools.call_tool("no_such_tool", {})
        assert unknown.is_error and "no_such_tool" in unknown.text
        bad_arguments = await tools.call_tool("structured", {"n": "not a number"})
        assert bad_arguments.is_error
        structured = await tools.call_tool("structured", {"n": 4})
        assert not structured.is_error and structured.structured_content == {"n": 4, "square": 16}
        assert json.loads(structured.text) == {"n": 4, "square": 16}


async def test_missing_command_strict_raises_and_lenient_drops() -> None:
    missing = MCPServerStdio(command="datus-no-such-mcp-server")
    with pytest.raises(MCPConnectError) as caught:
        async with multiple_mcp_servers({"good": fake_server(), "warehouse": missing}):
            pytest.fail("strict mode must not yield")
    assert caught.value.server == "warehouse"
    assert "MCP server 'warehouse' failed to start: command 'datus-no-such-mcp-server' not found" in str(caught.value)

    async with multiple_mcp_servers({"good": fake_server(), "warehouse": missing}, strict=False) as servers:
        assert list(servers) == ["good"] and "not found" in servers.failed["warehouse"]
        assert (await servers.call_tool("echo", {"text": "still here"})).text == "still here"


async def test_a_server_that_exits_at_start_is_named_with_its_stderr() -> None:
    with pytest.raises(MCPConnectError, match="'broken' failed to start: exited at start.*FOO_TOKEN is not set"):
        async with multiple_mcp_servers({"broken": EXITS_AT_START}, connect_retries=1):
            pass
    async with multiple_mcp_servers({"broken": EXITS_AT_START, "good": fake_server()}, strict=False,
                                    connect_retries=0) as servers:
        assert list(servers) == ["good"] and "FOO_TOKEN is not set" in servers.failed["broken"]


async def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    code = (f"import os, time; open({str(starts)!r}, 'a').write(f'{{os.getpid()}}\\n'); "
            "print('starting up'); time.sleep(600)")
    silent = MCPServerStdio(command=sys.executable, args=["-u", "-c", code])
    # without the 1 s handshake timeout this would wait out the 600 s sleep (or the 120 s test timeout)
    with pytest.raises(MCPConnectError, match="within 1s.*not MCP.*starting up"):
        async with multiple_mcp_servers({"silent": silent}, connect_timeout_s=1):
            pass
    pids = [int(line) for line in starts.read_text().split()]
    assert len(pids) == 1  # a handshake timeout is not retried
    assert not pid_alive(pids[0])  # and the silent server was stopped, not left sleeping


async def test_a_server_killed_mid_run_fails_the_call_naming_it() -> None:
    async with multiple_mcp_servers({"victim": fake_server(), "bystander": fake_server()}) as servers:
        assert "bystander__exit_now" in {tool.exposed_name for tool in await servers.tools()}
        pid = int((await servers["victim"].call_tool("pid")).text)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(MCPConnectionLostError, match="MCP server 'victim' closed the connection") as caught:
            with anyio.fail_after(10):
                await servers["victim"].call_tool("echo", {"text": "anyone?"})
        assert caught.value.server == "victim"
        with pytest.raises(MCPConnectionLostError, match="'bystander' closed the connection during tools/call"):
            await servers.call_tool("bystander__exit_now", {})  # dies while answering
    with pytest.raises(MCPConnectionLostError, match="not connected"):
        await servers["victim"].call_tool("echo", {"text": "after the block"})


@pytest.mark.parametrize("protocol", ["auto", "legacy"])
async def test_tool_list_cache_is_dropped_on_list_changed(protocol: str) -> None:
    async with multiple_mcp_servers({"tools": fake_server(protocol=protocol)}) as servers:
        tools = servers["tools"]
        # auto: the newest revision the installed SDK speaks (2026-07-28 on mcp 2.x, a 2025 one on 1.x)
        assert tools.protocol_version.startswith("2026" if protocol == "auto" and sdk.MODERN else "2025")
        before = [tool.name for tool in await tools.list_tools()]
        assert "added_quietly" not in before

        await tools.call_tool("add_tool", {"name": "added_quietly", "notify": False})
        await anyio.sleep(0.3)
        assert [tool.name for tool in await tools.list_tools()] == before  # served from the cache

        await tools.call_tool("announce")
        with anyio.fail_after(5):
            while "added_quietly" not in [tool.name for tool in await tools.list_tools()]:
                await anyio.sleep(0.05)
        assert (await servers.call_tool("added_quietly", {"text": "hi"})).text == "added_quietly:hi"


# ---------------------------------------------------------------- cleanup in the owning task


async def test_an_error_in_the_body_propagates_as_itself_and_stops_the_servers() -> None:
    with pytest.raises(KeyError, match="boom"):
        async with multiple_mcp_servers({"a": fake_server(), "b": fake_server()}) as servers:
            pids = [int((await servers[name].call_tool("pid")).text) for name in ("a", "b")]
            raise KeyError("boom")
    assert not any(pid_alive(pid) for pid in pids)


async def test_cancelling_the_body_or_the_connect_exits_cleanly() -> None:
    with anyio.CancelScope() as scope:  # the deadline starts once connected: startup is slow under load
        async with multiple_mcp_servers({"a": fake_server()}) as servers:
            pid = int((await servers["a"].call_tool("pid")).text)
            scope.deadline = anyio.current_time() + 0.5
            await anyio.sleep(30)
    assert scope.cancelled_caught and not pid_alive(pid)

    # cancelled while still connecting: 'slow' would not answer before its handshake timed out,
    # and that failure (not the cancellation) would come out if the cancel waited for it
    with anyio.move_on_after(0.5) as scope:
        async with multiple_mcp_servers({"slow": fake_server("--delay", "600", "--tag", "cancel-connect"),
                                         "fast": fake_server("--tag", "cancel-connect")}, connect_timeout_s=30):
            pytest.fail("must not connect")
    assert scope.cancelled_caught and not children_with("cancel-connect")

    async def hold() -> None:
        async with multiple_mcp_servers({"a": fake_server()}):
            await asyncio.sleep(30)

    with pytest.raises(TimeoutError):  # plain asyncio cancellation, from another API
        await asyncio.wait_for(hold(), timeout=2)


async def test_a_failure_midway_leaves_no_server_behind() -> None:
    # 'good' is connected and serving when 'broken' fails; strict mode tears 'good' down again.
    late = MCPServerStdio(command=sys.executable, args=["-c", "import sys, time; time.sleep(1.5); sys.exit('late')"])
    with pytest.raises(MCPConnectError, match="'broken' failed to start: exited at start.*late") as caught:
        async with multiple_mcp_servers({"good": fake_server("--tag", "midway"), "broken": late}, connect_retries=0):
            pytest.fail("strict mode must not yield")
    assert not isinstance(caught.value, BaseExceptionGroup)
    assert not children_with("midway")


def children_with(marker: str) -> list[int]:
    """Our child processes whose command line holds ``marker`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid() and marker in (entry / "cmdline").read_text():
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


# ---------------------------------------------------------------- streamable HTTP


async def test_streamable_http_server() -> None:
    with http_server(sys.executable, str(FAKE_SERVER), "--transport", "streamable-http") as url:
        spec = MCPServerStreamableHttp(url=url, headers={"X-Request-Source": "datus-tests"})
        async with multiple_mcp_servers({"remote": spec, "local": fake_server()}) as servers:
            tools = {tool.exposed_name for tool in await servers.tools()}
            assert {"remote__echo", "local__echo"} <= tools
            assert (await servers.call_tool("remote__echo", {"text": "over http"})).text == "over http"
            await servers.call_tool("remote__add_tool", {"name": "late_tool"})
            with anyio.fail_after(5):
                while "late_tool" not in {tool.exposed_name for tool in await servers.tools()}:
                    await anyio.sleep(0.05)


async def test_refused_http_connection_strict_and_lenient() -> None:
    closed = MCPServerStreamableHttp(url=f"http://127.0.0.1:{free_port()}/mcp")
    with pytest.raises(MCPConnectError, match=r"'remote' failed to start: connection to http://127\S+ refused"):
        async with multiple_mcp_servers({"remote": closed}, connect_retries=1):
            pass
    async with multiple_mcp_servers({"remote": closed, "local": fake_server()}, strict=False) as servers:
        assert list(servers) == ["local"] and "refused" in servers.failed["remote"]


# ---------------------------------------------------------------- the reference server (mcp<2)


@pytest.fixture(scope="module")
def reference_sqlite_server() -> Path:
    return build_reference_sqlite_server()


async def test_reference_mcp_server_sqlite_next_to_ours(reference_sqlite_server: Path, tmp_path: Path) -> None:
    db = make_shop_db(tmp_path / "shop.db", rows=4)
    reference = MCPServerStdio(command=str(reference_sqlite_server), args=["--db-path", str(db)])
    async with multiple_mcp_servers({"reference": reference, "ours": sql_server(db)}) as servers:
        assert servers["reference"].protocol_version.startswith("20")  # negotiated down to its revision
        tools = {tool.exposed_name for tool in await servers.tools()}
        assert {"reference__read_query", "ours__read_query", "write_query", "append_insight"} <= tools
        theirs = await servers.call_tool("reference__read_query", {"query": "SELECT name FROM customers WHERE id = 2"})
        assert not theirs.is_error and "customer 1" in theirs.text
        ours = await servers.call_tool("ours__read_query", {"query": "SELECT name FROM customers WHERE id = 2"})
        assert json.loads(ours.text)["rows"] == [["customer 1"]]
