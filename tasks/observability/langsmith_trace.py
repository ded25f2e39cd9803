"""LangSmith run trees of jobs, through the ``langsmith`` SDK (`tasks.observability.traces`
decides when this is on).

One run tree per job run: the job (run type ``chain``, named after its task, ``dq.generate`` /
``dq.tool_run``; inputs: prompt or messages, instruction) with a child per model call
(``llm``, ``chat <model>``: the messages sent, the answer, finish reason, and token usage as
``usage_metadata``) and per tool call (``tool``, named after the tool: its arguments and
result). The job's run is posted when it starts (a running job shows in LangSmith) and patched
when it ends; a call's run is posted once, when it ends (one operation instead of two per
call). The SDK's client queues them and sends batches from its own thread (``/runs/multipart``
or ``/runs/batch``), so the job never waits for LangSmith. ``LANGSMITH_HIDE_INPUTS`` / ``LANGSMITH_HIDE_OUTPUTS`` (the
SDK's) blank inputs / outputs before they leave the process. The API key goes to the client
only: the runs carry no environment (``omit_traced_runtime_info``) and their metadata is what
is written here — job id, run (the store's run number), provider, model, kind, batch id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from langsmith import Client
from langsmith.run_trees import RunTree

from datus_queue.tasks.observability.traces import JobInfo

__all__ = ["LangSmithBackend"]

logger = logging.getLogger("datus_queue.tasks.observability.langsmith_trace")


class LangSmithBackend:
    def __init__(self, api_key: str, endpoint: str | None, project: str) -> None:
        self.client = Client(api_url=endpoint, api_key=api_key, omit_traced_runtime_info=True)
        self.project = project
        logger.info("LangSmith tracing on: project %s at %s", project, self.client.api_url)

    def start_job(self, job: JobInfo, carrier: Mapping[str, Any] | None) -> _JobRun:
        request = job.request
        inputs: dict[str, Any] = {}
        if request.prompt is not None:
            inputs["prompt"] = request.prompt
        if request.messages is not None:
            inputs["messages"] = request.messages
        if request.instruction:
            inputs["instruction"] = request.instruction
        metadata = {"job_id": job.job_id, "run": job.run, "provider": job.provider, "model": job.model,
                    "kind": job.kind}
        if job.batch_id is not None:
            metadata["batch_id"] = job.batch_id
        run = RunTree(name=job.task, run_type="chain", inputs=inputs, project_name=self.project,
                      ls_client=self.client, extra={"metadata": metadata}, tags=[job.kind, job.provider])
        run.post()
        return _JobRun(run)

    def shutdown(self, timeout_s: float) -> None:
        self.client.flush(timeout=timeout_s)


class _JobRun:
    """The job's run, and the observer (`datus.models.observe`) of its calls."""

    def __init__(self, run: RunTree) -> None:
        self.run = run

    def model_call(self, call: Any) -> _LlmRun:
        request = call.request
        options = request.options
        metadata: dict[str, Any] = {"ls_provider": call.provider, "ls_model_name": call.model,
                                    "ls_model_type": "chat"}
        if options.temperature is not None:
            metadata["ls_temperature"] = options.temperature
        if options.max_tokens is not None:
            metadata["ls_max_tokens"] = options.max_tokens
        inputs: dict[str, Any] = {"messages": [_message(message) for message in request.messages]}
        if request.tools:
            inputs["tools"] = [{"name": tool.name, "description": tool.description} for tool in request.tools]
        child = self.run.create_child(f"chat {call.model}", run_type="llm", inputs=inputs,
                                      extra={"metadata": metadata})
        return _LlmRun(child)

    def tool_call(self, call: Any) -> _ToolRun:
        metadata = {"server": call.server} if call.server else {}
        child = self.run.create_child(call.name, run_type="tool", inputs={"arguments": call.arguments},
                                      extra={"metadata": {**metadata, "tool_call_id": call.call_id}})
        return _ToolRun(child)

    def finish(self, status: str, output: Any, error: Any) -> None:
        outputs: dict[str, Any] = {"status": status}
        if output is not None:
            outputs["output"] = output
        message = None
        if error is not None and status != "succeeded":
            message = f"{error.get('code')}: {error.get('message') or ''}".rstrip(": ") \
                if isinstance(error, dict) else str(error)
        self.run.add_metadata({"status": status})
        self.run.end(outputs=outputs, error=message)
        self.run.patch()


class _LlmRun:
    def __init__(self, run: RunTree) -> None:
        self.run = run

    def end(self, result: Any, error: BaseException | None) -> None:
        if result is None:
            self.run.end(error=_error_text(error))
        else:
            usage = result.usage
            usage_metadata: dict[str, Any] = {
                "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                "total_tokens": usage.total_tokens,
                "input_token_details": {"cache_read": usage.cached_tokens, "cache_creation": usage.cache_write_tokens},
                "output_token_details": {"reasoning": usage.reasoning_tokens},
            }
            if usage.priced:
                usage_metadata["total_cost"] = usage.cost_usd
            self.run.set(usage_metadata=usage_metadata)
            self.run.add_metadata({"attempts": usage.attempts, "latency_ms": round(usage.latency_ms, 3)})
            answer = _message(result.message())
            self.run.end(outputs={"message": answer, "finish_reason": result.finish_reason,
                                  "usage_metadata": usage_metadata})
        self.run.post()  # ended: its one operation


class _ToolRun:
    def __init__(self, run: RunTree) -> None:
        self.run = run

    def end(self, result: Any, error: BaseException | None) -> None:
        if result is None:
            self.run.end(error=_error_text(error))
        elif result.is_error:
            # the error text stays in outputs, which LANGSMITH_HIDE_OUTPUTS hides
            self.run.end(outputs={"output": result.text}, error="the tool reported an error")
        else:
            self.run.end(outputs={"output": result.text})
        self.run.post()  # ended: its one operation


def _message(message: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        data["tool_calls"] = [{"id": call.id, "name": call.name, "arguments": call.arguments}
                              for call in message.tool_calls]
    if message.tool_call_id:
        data["tool_call_id"] = message.tool_call_id
    return data


def _error_text(error: BaseException | None) -> str:
    if error is None:
        return "ended without a result"
    code = getattr(error, "code", None)
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    return f"{getattr(code, 'value', code)}: {text}" if code is not None else f"{type(error).__name__}: {text}"
