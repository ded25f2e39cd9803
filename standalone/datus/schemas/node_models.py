"""`SQLContext`, as Datus-agent's ``datus/schemas/node_models.py`` defines it: one SQL statement
a model ran through a tool, with its outcome.

For installations without Datus-agent (``datus-queue-standalone``); where Datus-agent is
installed its own class is used, so nodes that validate ``List[SQLContext]`` accept what the
model layer returns. Fields, defaults and methods are Datus's.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

__all__ = ["SQLContext"]

logger = logging.getLogger(__name__)


class SQLContext(BaseModel):
    sql_query: str = Field(..., description="the SQL text itself")
    explanation: str | None = Field("", description="what the SQL does")
    sql_return: Any = Field(default="", description="what running it returned")
    sql_error: str | None = Field("", description="the error running it gave")
    row_count: int | None = Field(0, description="rows returned")
    reflection_strategy: str | None = Field("", description="the reflection strategy")
    reflection_explanation: str | None = Field("", description="the reflection explanation")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def _return_text(self) -> str:
        if self.sql_return is None:
            return ""
        if hasattr(self.sql_return, "to_csv"):  # a DataFrame
            return "Empty result set" if self.sql_return.empty else self.sql_return.to_csv(index=False)
        return str(self.sql_return)

    def to_str(self, max_sql_return_length: int = 4294967296) -> str:
        returned = self._return_text()
        if len(returned) > max_sql_return_length:
            logger.warning("Sql return is too long, truncating to %s characters", max_sql_return_length)
            returned = returned[:max_sql_return_length] + "\n... (truncated)"
        return self._format(returned)

    def to_sample_str(self) -> str:
        return self._format(self._return_text())

    def _format(self, returned: str) -> str:
        return (
            f"SQL: {self.sql_query}\n"
            f"Explanation: {self.explanation}\n"
            f"Result: {returned}\n"
            f"Reflection Strategy: {self.reflection_strategy}\n"
            f"Reflection Explanation: {self.reflection_explanation}"
        )
