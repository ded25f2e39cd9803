"""Job requests refuse what a worker could not use, at submit, naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from datus_queue.tasks.schemas import JobRequest


@pytest.mark.parametrize("session_id", ["../../etc/passwd", "a/b", "", "x" * 201, "with space"])
def test_a_session_id_must_be_one_the_session_store_accepts(session_id: str) -> None:
    with pytest.raises(ValidationError, match="session_id") as caught:
        JobRequest(model="m", prompt="hi", session_id=session_id)
    assert "etc/passwd" not in str(caught.value)  # errors never echo the value (hide_input_in_errors)


def test_session_ids_datus_makes_are_accepted() -> None:
    # agentic_node.py:160-162 of Datus-agent: f"{node_name}_session_{uuid4().hex[:8]}"
    assert JobRequest(model="m", prompt="hi", session_id="chat_session_1a2b3c4d").session_id == "chat_session_1a2b3c4d"
