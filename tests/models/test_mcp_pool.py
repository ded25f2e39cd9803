"""`datus.models.mcp.pool.MCPPool` against real MCP server processes (tests/fakes/mcp_tool_server.py):
servers kept across leases, many requests on one process, the tool list cached until the
server says it changed, idle sessions closed, dead ones noticed and restarted with back-off,
``shared: false`` servers started per lease, everything stopped by ``aclose``."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from datus.models.mcp.pool import MCPPool
from datus.models.mcp_utils import MCPConnectionLostError
from tests.mcp_servers.conftest import fake_server, pid_alive


async def _pid(group) -> int:
    return int((await group.call_tool("pid", {})).text)


async def test_a_server_is_started_once_and_kept_across_leases() -> None:
    pool = MCPPool()
    spec = fake_server()
    try:
        async with pool.lease({"fake": spec}) as group:
            first = await _pid(group)
        async with pool.lease({"fake": spec}) as group:
            assert await _pid(group) == first  # the same process: not stopped with the lease
        async with pool.lease({"fake": spec.model_copy(update={"args": [*spec.args, "--tag", "other"]})}) as group:
            assert await _pid(group) != first  # another config is another server
        assert pool.stats()["fake"]["starts"] == 2
    finally:
        await pool.aclose()
    assert not pid_alive(first)


async def test_concurrent_requests_share_one_session_up_to_its_limit(tmp_path: Path) -> None:
    record = tmp_path / "record.log"
    pool = MCPPool()
    spec = fake_server("--record", str(record), requests_per_session=8, max_sessions=2)
    try:
        async with pool.lease({"fake": spec}) as group:
            await asyncio.gather(*(group.call_tool("record", {"tag": f"t{i}", "hold_s": 0.3}) for i in range(8)))
            lines = record.read_text().split("\n")
            assert len({line.split()[-1] for line in lines if line.startswith("call")}) == 1  # one process, 8 at once
            await asyncio.gather(*(group.call_tool("record", {"tag": f"u{i}", "hold_s": 0.3}) for i in range(12)))
        assert pool.stats()["fake"]["starts"] == 2  # past 8 in flight a second session opened, and no third
    finally:
        await pool.aclose()


async def test_the_tool_list_is_cached_until_the_server_says_it_changed() -> None:
    pool = MCPPool()
    try:
        async with pool.lease({"fake": fake_server()}) as group:
            before = {tool.name for tool in await group.tools()}
            await group.call_tool("add_tool", {"name": "quiet", "notify": False})
            assert {tool.name for tool in await group.tools()} == before  # cached: no notice came
            await group.call_tool("add_tool", {"name": "loud"})
            for _ in range(100):  # the notice arrives asynchronously
                names = {tool.name for tool in await group.tools()}
                if "loud" in names:
                    break
                await asyncio.sleep(0.02)
            assert {"quiet", "loud"} <= names
    finally:
        await pool.aclose()


async def test_a_dead_server_fails_the_call_in_flight_and_is_restarted_on_the_next() -> None:
    pool = MCPPool()
    try:
        async with pool.lease({"fake": fake_server()}) as group:
            first = await _pid(group)
            with pytest.raises(MCPConnectionLostError) as info:
                await group.call_tool("exit_now", {})
            assert getattr(info.value, "server_lost", False)
            second = await _pid(group)
            assert second != first and pool.stats()["fake"] == {"sessions": 1, "starts": 2, "losses": 1}
            os.kill(second, signal.SIGKILL)  # found dead by the health check or the next call
            await asyncio.sleep(0.2)
            third = await _pid(group) if pool.stats()["fake"]["sessions"] == 0 else None
            if third is None:  # not yet noticed: the call itself notices
                with pytest.raises(MCPConnectionLostError):
                    await _pid(group)
                third = await _pid(group)
            assert third not in (first, second) and pool.stats()["fake"]["losses"] == 2
    finally:
        await pool.aclose()


async def test_idle_sessions_close_and_health_checks_find_dead_ones() -> None:
    pool = MCPPool(health_interval_s=0.1)
    try:
        async with pool.lease({"fake": fake_server(idle_timeout_s=0.6)}) as group:
            first = await _pid(group)
            os.kill(first, signal.SIGKILL)
            for _ in range(100):  # nobody calls: the ping finds it dead
                if pool.stats()["fake"]["losses"] == 1:
                    break
                await asyncio.sleep(0.05)
            assert pool.stats()["fake"]["losses"] == 1
            second = await _pid(group)
            await asyncio.sleep(0.3)  # health checks of a live server leave it alone
            assert pool.stats()["fake"]["losses"] == 1 and await _pid(group) == second
        for _ in range(100):
            if not pid_alive(second):
                break
            await asyncio.sleep(0.05)
        assert not pid_alive(second) and pool.stats()["fake"]["sessions"] == 0  # closed once idle
    finally:
        await pool.aclose()


async def test_a_server_that_is_not_shared_gets_a_process_per_lease() -> None:
    pool = MCPPool()
    spec = fake_server(shared=False)
    try:
        async with pool.lease({"own": spec}) as group:
            first = await _pid(group)
        assert not pid_alive(first)  # stopped with its lease
        async with pool.lease({"own": spec}) as group:
            assert await _pid(group) != first
        assert "own" not in pool.stats()
    finally:
        await pool.aclose()
