"""A pytest plugin for ``run_datus_tests.py --mode queue``: Datus-agent's model tests, with every
model they make queue-backed — a `QueueModel` serving the same agent.yml entry, each call a job
run by a real ``dq worker``.

Datus's tests build their model classes directly (``ClaudeModel(model_config=config["anthropic"])``),
so configuration alone cannot reach them: once the tests are collected, each model class a test
module imported (an `LLMBaseModel` subclass) is replaced in that module by a factory that finds
the entry of the given config in the fleet's agent.yml (``DQ_CONFIG``: the tests' own, pointed at
the fakes) by type and model name, and returns ``QueueModel({type: queue, model: <entry>})``.
Nothing else changes: the tests' assertions, arguments and tools are Datus's.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from datus.models.base import LLMBaseModel
from datus.models.config import ModelConfig


def _entry(config: Any) -> str:
    with open(os.environ["DQ_CONFIG"], encoding="utf-8") as file:
        models = (yaml.safe_load(file).get("agent") or {}).get("models") or {}
    wanted = ModelConfig.coerce(config) if config is not None else None
    for name, entry in models.items():
        if wanted is None or (entry.get("model") == wanted.model and str(entry.get("type")) == str(wanted.type)):
            return name
    raise LookupError(f"no entry of the fleet's agent.yml serves {wanted!r}")


def _queue_backed(cls: type[LLMBaseModel]) -> Any:
    def make(model_config: Any = None, *args: Any, **kwargs: Any) -> LLMBaseModel:
        from datus.models.queue_model import QueueModel

        return QueueModel(model_config=ModelConfig(type="queue", model=_entry(model_config)))

    make.__name__ = make.__qualname__ = f"queue_backed_{cls.__name__}"
    return make


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    from datus.models.queue_model import QueueModel

    modules = {id(item.module): item.module for item in items if getattr(item, "module", None) is not None}
    for module in modules.values():
        for name, value in list(vars(module).items()):
            if isinstance(value, type) and issubclass(value, LLMBaseModel) and value is not QueueModel \
                    and value is not LLMBaseModel:
                setattr(module, name, _queue_backed(value))
