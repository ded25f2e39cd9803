"""`ActionHistory`: one step of a model run (user input, reasoning, tool call, tool result,
final answer), streamed as it happens and kept by an `ActionHistoryManager`.

The classes of Datus-agent's ``datus/schemas/action_history.py``, for installations without
Datus-agent (``datus-queue-standalone``); where Datus-agent is installed its own module is
used. Fields, methods and enum values are Datus's.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ActionHistory", "ActionHistoryManager", "ActionRole", "ActionStatus"]


class ActionRole(str, Enum):
    SYSTEM = "system"
    ASSISTANT = "assistant"
    USER = "user"
    TOOL = "tool"
    WORKFLOW = "workflow"


class ActionStatus(str, Enum):
    PROCESSING = "processing"
    SUCCESS = "success"
    FAILED = "failed"


class ActionHistory(BaseModel):
    model_config = ConfigDict(use_enum_values=True)

    action_id: str = Field(..., description="unique id of the action")
    role: ActionRole
    messages: str = Field(default="", description="thought or text behind the action")
    action_type: str = Field(..., description="node type, tool name or message kind")
    input: Any = None
    output: Any = None
    status: ActionStatus
    start_time: datetime = Field(default_factory=datetime.now)
    end_time: datetime | None = None

    @classmethod
    def create_action(
        cls,
        role: ActionRole,
        action_type: str,
        messages: str,
        input_data: Any,
        output_data: Any = None,
        status: ActionStatus = ActionStatus.PROCESSING,
    ) -> ActionHistory:
        return cls(
            action_id=str(uuid.uuid4()),
            role=role,
            messages=messages,
            action_type=action_type,
            input=input_data,
            output=output_data,
            status=status,
        )

    def is_done(self) -> bool:
        return self.status in (ActionStatus.SUCCESS, ActionStatus.FAILED)

    def function_name(self) -> str:
        return "" if not self.input else str(self.input.get("function_name", "unknown"))


class ActionHistoryManager:
    """Keeps the actions of one run in order."""

    def __init__(self) -> None:
        self.actions: list[ActionHistory] = []
        self.current_action_id: str | None = None

    def add_action(self, action: ActionHistory) -> None:
        self.actions.append(action)
        self.current_action_id = action.action_id

    def update_current_action(self, **kwargs: Any) -> None:
        if self.current_action_id and self.actions and self.actions[-1].action_id == self.current_action_id:
            _update(self.actions[-1], kwargs)

    def get_actions(self) -> list[ActionHistory]:
        return self.actions

    def clear(self) -> None:
        self.actions.clear()
        self.current_action_id = None

    def find_action_by_id(self, action_id: str) -> ActionHistory | None:
        return next((action for action in self.actions if action.action_id == action_id), None)

    def update_action_by_id(self, action_id: str, **kwargs: Any) -> bool:
        action = self.find_action_by_id(action_id)
        if action is None:
            return False
        _update(action, kwargs)
        return True


def _update(action: ActionHistory, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if hasattr(action, key):
            setattr(action, key, value)
