"""`SQLContext`: one SQL statement a model ran through a tool, with its outcome."""

from __future__ import annotations

from pydantic import BaseModel, Field

__all__ = ["SQLContext"]


class SQLContext(BaseModel):
    sql_query: str = Field(description="the SQL text itself")
    explanation: str = ""
    sql_return: str = ""
    sql_error: str | None = None
    row_count: int | None = None
    reflection_strategy: str | None = None
    reflection_explanation: str | None = None
