"""A small MCP server for the tests of `datus.models.mcp_utils` (run as a script).

    python tests/fakes/mcp_tool_server.py [--delay 1] [--transport streamable-http --port N] [--record FILE]

Tools: ``echo``, ``blob`` (a text of any size), ``pid`` (to kill it from a test), ``add_tool``
(adds a tool, and announces the change unless ``notify=False``), ``announce`` (announces a
change), ``fail`` (a tool error), ``structured`` (structured content), ``exit_now`` (dies in the middle of a call),
``record`` (appends ``call <tag> <pid>`` to the ``--record`` file; its first call of a tag holds ``hold_s``; the
server appends ``start <pid>`` there when it starts: a test counts calls and processes).
Change notices go out on both MCP eras: to ``subscriptions/listen`` streams (2026-07-28)
and as a plain ``notifications/tools/list_changed`` on handshake-era connections. It runs on
mcp 1.x (FastMCP) and 2.x (MCPServer) alike, through `datus.models.mcp.sdk`.
"""

# No `from __future__ import annotations`: FastMCP of mcp 1.12 and before finds the `ctx: Context`
# parameter by its annotation object; a string annotation would make ctx a required argument.
import argparse
import asyncio
import os
import time

from datus.models.mcp import sdk
from datus.models.mcp.sdk import Context, ToolError

server = sdk.new_server("fake-tools")
RECORD: list[str] = []  # the --record file, once parsed


def _append(line: str) -> None:
    if RECORD:
        with open(RECORD[0], "a", encoding="utf-8") as out:
            out.write(line + "\n")


def _recorded(tag: str) -> bool:
    if not RECORD or not os.path.exists(RECORD[0]):
        return False
    with open(RECORD[0], encoding="utf-8") as recorded:
        return f"call {tag} " in recorded.read()


@server.tool()
def echo(text: str) -> str:
    """Return the text."""
    return text


@server.tool()
def blob(size: int, char: str = "x") -> str:
    """A text of `size` characters (an answer too big for the model's context)."""
    return (char or "x")[0] * size


@server.tool()
def pid() -> int:
    """This server's process id."""
    return os.getpid()


@server.tool()
async def add_tool(name: str, ctx: Context, notify: bool = True) -> str:
    """Add a tool called `name` that echoes with a prefix."""

    def added(text: str) -> str:
        return f"{name}:{text}"

    server.add_tool(added, name=name, description=f"added at run time as {name}")
    if notify:
        await sdk.announce_tools_changed(ctx)
    return f"added {name}"


@server.tool()
async def announce(ctx: Context) -> str:
    """Announce that the tool list changed."""
    await sdk.announce_tools_changed(ctx)
    return "announced"


@server.tool()
def fail(message: str) -> str:
    """Fail with the message."""
    raise ToolError(message)


@server.tool()
def structured(n: int) -> dict[str, int]:
    """Structured content: n and its square."""
    return {"n": n, "square": n * n}


@server.tool()
async def record(tag: str, hold_s: float = 0.0) -> str:
    """Record a call with this tag (a side effect a test can count); the first call of a tag
    then waits hold_s seconds (a call made again answers at once)."""
    again = _recorded(tag)
    _append(f"call {tag} {os.getpid()}")
    if hold_s and not again:
        await asyncio.sleep(hold_s)
    return f"recorded {tag}"


@server.tool()
def exit_now() -> str:
    """Die without answering."""
    os._exit(3)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before serving")
    parser.add_argument("--transport", choices=("stdio", "streamable-http"), default="stdio")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tag", default="", help="ignored: lets a test find this process")
    parser.add_argument("--record", default="", help="file the record tool appends to")
    args = parser.parse_args()
    time.sleep(args.delay)
    if args.record:
        RECORD.append(args.record)
        _append(f"start {os.getpid()}")
    sdk.run_server(server, args.transport, port=args.port)
