"""The Datus import path of the MCP server API: specs, the server group, the errors.

The code lives in `datus.models.mcp` (`servers`, `connection`, `tools`, `pool`); this module
keeps ``from datus.models.mcp_utils import ...`` working for code written against Datus.
"""

from __future__ import annotations

from datus.models.mcp.servers import *
from datus.models.mcp.servers import __all__  # noqa: F401
