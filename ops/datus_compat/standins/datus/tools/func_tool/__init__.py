"""Stand-in for Datus-agent's ``datus.tools.func_tool`` (standalone mode of ops/datus_compat):
``db_function_tools(agent_config)`` gives the five tools Datus gives for a SQLite namespace, as
FunctionTool objects with Datus's names, argument schemas and result shapes (callsites.md §8),
over the namespace's database file."""

from __future__ import annotations

from datus.tools.func_tool.database import db_function_tools

__all__ = ["db_function_tools"]
