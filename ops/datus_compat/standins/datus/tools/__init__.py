"""Stand-in for Datus-agent's ``datus.tools`` package (standalone mode of ops/datus_compat)."""
