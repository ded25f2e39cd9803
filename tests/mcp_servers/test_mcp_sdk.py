"""What `datus.models.mcp.sdk` hides: the same client behaviour on mcp 1.x (what Datus-agent's
openai-agents pins) and mcp 2.x, against real server processes built on the installed SDK.
Run the MCP tests in a venv of each, e.g. for 1.x::

    python3.12 -m venv /tmp/mcp1 && /tmp/mcp1/bin/pip install -e ./standalone -e '.[dev]' 'mcp<2'
    /tmp/mcp1/bin/python -m pytest tests/mcp_servers tests/models/test_mcp_utils.py tests/models/test_mcp_pool.py
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator

import anyio
import mcp.types
import pytest

from datus.models.mcp import sdk
from datus.models.mcp_utils import (
    MCPConnection,
    MCPConnectionLostError,
    MCPRequestTimeoutError,
    MCPServerSpec,
    MCPServerStreamableHttp,
    multiple_mcp_servers,
)
from tests.mcp_servers.conftest import FAKE_SERVER, fake_server, http_server

# the newest revision the initialize handshake reaches with this SDK
HANDSHAKE_LATEST = "2025-11-25" if sdk.MODERN else mcp.types.LATEST_PROTOCOL_VERSION


@pytest.mark.parametrize("protocol", ["auto", "legacy"])
async def test_the_protocol_revision_is_the_newest_both_ends_speak(protocol: str) -> None:
    async with multiple_mcp_servers({"tools": fake_server(protocol=protocol)}) as servers:
        negotiated = servers["tools"].protocol_version
    # only mcp 2.x has the 2026-07-28 revision (server/discover); 'legacy' keeps to the handshake
    assert negotiated == ("2026-07-28" if sdk.MODERN and protocol == "auto" else HANDSHAKE_LATEST)


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_a_request_past_its_timeout_raises_and_the_connection_serves_on(transport: str) -> None:
    # request_timeout_s is off by default; a held tool call outlasts 1 s
    async with _one_server(transport, request_timeout_s=1) as server:
        with pytest.raises(MCPRequestTimeoutError, match=r"'tools' did not answer tools/call 'record' within 1s"):
            await server.call_tool("record", {"tag": "slow", "hold_s": 5})
        assert (await server.call_tool("echo", {"text": "still here"})).text == "still here"


async def test_an_http_server_that_dies_fails_the_call_naming_it() -> None:
    async with _one_server("http") as server:
        pid = int((await server.call_tool("pid")).text)
        os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(30):  # a lost server must fail the call, never hang it
            with pytest.raises(MCPConnectionLostError, match="MCP server 'tools' closed the connection"):
                await server.call_tool("echo", {"text": "anyone?"})


@pytest.mark.parametrize("protocol", ["auto", "legacy"])
async def test_tool_changes_arrive_over_http_in_either_revision(protocol: str) -> None:
    async with _one_server("http", protocol=protocol) as server:
        assert "late" not in {tool.name for tool in await server.list_tools()}  # cached from here on
        await server.call_tool("add_tool", {"name": "late"})
        with anyio.fail_after(10):
            while "late" not in {tool.name for tool in await server.list_tools()}:
                await anyio.sleep(0.05)
        assert (await server.call_tool("late", {"text": "x"})).text == "late:x"


@contextlib.asynccontextmanager
async def _one_server(transport: str, **spec: object) -> AsyncIterator[MCPConnection]:
    """The fake tool server over stdio or streamable HTTP, connected as 'tools'."""
    with contextlib.ExitStack() as stack:
        if transport == "http":
            url = stack.enter_context(http_server(sys.executable, str(FAKE_SERVER), "--transport", "streamable-http"))
            server: MCPServerSpec = MCPServerStreamableHttp(url=url, **spec)  # type: ignore[arg-type]
        else:
            server = fake_server(**spec)
        async with multiple_mcp_servers({"tools": server}) as servers:
            yield servers["tools"]
