"""What Datus does with the objects and errors the model layer hands back."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any, List, Optional

import pytest
import yaml
from pydantic import BaseModel

from datus.models.base import LLMBaseModel
from datus.models.errors import MaxTurnsExceededError, ModelError, PermissionDeniedError
from datus.models.scripted import Fault, Reply
from datus.schemas.action_history import ActionHistory, ActionRole, ActionStatus
from datus.schemas.node_models import SQLContext
from datus.testing.fake_server import FakeProviderServer
from datus.utils.exceptions import DatusException, ErrorCode


def test_action_history_methods_datus_calls() -> None:
    """cli/chat_commands.py:693-734: action.is_done(), action.role == ActionRole.TOOL,
    action.function_name() == "read_query"; cli/action_history_display.py:480,505 call
    .upper() on role and status (plain strings: use_enum_values)."""
    action = ActionHistory.create_action(ActionRole.TOOL, "read_query", "Tool call", {"function_name": "read_query"},
                                         {"success": True, "raw_output": {"success": 1}}, ActionStatus.SUCCESS)
    assert action.is_done() and action.role == ActionRole.TOOL and action.function_name() == "read_query"
    assert action.role.upper() == "TOOL" and action.status.upper() == "SUCCESS"
    pending = ActionHistory.create_action(ActionRole.ASSISTANT, "message", "…", None)
    assert not pending.is_done() and pending.function_name() == ""


class ReasoningResult(BaseModel):
    """The field of Datus's ReasoningResult (schemas/reason_sql_node_models.py) that receives
    generate_with_tools()["sql_contexts"] (tools/llms_tools/reasoning_sql.py:206-213)."""

    sql_contexts: List[SQLContext]
    sql_query: Optional[str] = ""


def test_sql_context_is_datus_class_with_its_methods() -> None:
    """reason_sql_node.py:74-88 keeps contexts whose sql_error == ""; generate_sql_node.py:254
    and reasoning_sql.py:44,157 render them with to_str(); agent_commands.py:649-650 reads
    sql_query/sql_return/row_count."""
    context = SQLContext(sql_query="SELECT 1", sql_return="1", row_count=1)
    result = ReasoningResult(sql_contexts=[context])
    assert result.sql_contexts[0].sql_error == "" and result.sql_contexts[0].row_count == 1
    assert "SQL: SELECT 1" in context.to_str() and context.to_dict()["sql_query"] == "SELECT 1"
    assert "(truncated)" in SQLContext(sql_query="x", sql_return="y" * 50).to_str(max_sql_return_length=10)


def test_every_model_error_is_a_datus_exception_with_datus_codes(datus_config: Any, server: FakeProviderServer) -> None:
    """tools/llms_tools/reasoning_sql.py:220-221 catches DatusException and re-raises it; others
    read str(e) (:228 checks '403'/'forbidden'/'permission' in str(e).lower()); Datus's
    exception handler prints e.message (utils/exceptions.py)."""
    server.script.add(Fault(kind="status", status=403, message="Permission denied for this key"), times=None)
    model = LLMBaseModel.create_model(datus_config)
    with pytest.raises(DatusException) as caught:
        model.generate("hi")
    error = caught.value
    assert isinstance(error, PermissionDeniedError) and error.code is ErrorCode.MODEL_PERMISSION_ERROR
    assert "permission" in str(error).lower()
    assert error.message.startswith(f"error_code={ErrorCode.MODEL_PERMISSION_ERROR.code}, error_message=")


def test_max_turns_error_has_the_code_datus_compares() -> None:
    """tests/test_claude_model.py:146, test_deepseek_model.py:146,192 compare e.code ==
    ErrorCode.MODEL_MAX_TURNS_EXCEEDED; test_other_models.py:104,279,386 use e.error_code."""
    error = MaxTurnsExceededError("no final answer within max_turns=2")
    assert error.code == ErrorCode.MODEL_MAX_TURNS_EXCEEDED and error.error_code == ErrorCode.MODEL_MAX_TURNS_EXCEEDED
    assert isinstance(error, DatusException)
    clone = pickle.loads(pickle.dumps(error))  # errors cross Redis in the job system
    assert type(clone) is MaxTurnsExceededError and clone.code is ErrorCode.MODEL_MAX_TURNS_EXCEEDED


def test_error_codes_datus_lacks_still_format_like_datus_codes() -> None:
    """Datus formats any DatusException with e.code.code and e.code.desc (exceptions.py build_msg)."""
    for cls in ModelError.__subclasses__():
        code = cls.error_code
        assert isinstance(code.code, str) and isinstance(code.desc, str), cls


def test_set_context_writes_the_nodes_trajectory_trace(datus_config: Any, server: FakeProviderServer,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """agent/node/node.py:190-196: with save_llm_trace the node calls
    set_context(workflow=..., current_node=...); Datus's layer then writes
    {trajectory_dir}/{task.id}/{node.id}.yml (openai_compatible.py:1077-1158)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # this layer's own per-call traces go to ~/.datus/traces
    config = datus_config.models["deepseek"]
    config.save_llm_trace = True  # agent_config.py:498-501 sets it on every model for --save_llm_trace
    model = LLMBaseModel.create_model(datus_config)
    assert model.model_config.save_llm_trace
    workflow = SimpleNamespace(global_config=SimpleNamespace(trajectory_dir=str(tmp_path)), task=SimpleNamespace(id="t1"))
    model.set_context(workflow=workflow, current_node=SimpleNamespace(id="node_3"))
    server.script.add(Reply(text="SELECT 42", reasoning="think"))
    model.generate([{"role": "system", "content": "be brief"}, {"role": "user", "content": "the answer?"}])
    trace = yaml.safe_load((tmp_path / "t1" / "node_3.yml").read_text())
    assert trace == {"system_prompt": "be brief", "user_prompt": "the answer?", "reason_content": "think",
                     "output_content": "SELECT 42"}
