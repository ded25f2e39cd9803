"""OpenTelemetry spans of jobs over OTLP/HTTP (`tasks.observability.traces` decides when this
is on: ``DQ_OTEL_TRACING=true``).

The process gets a tracer provider of its own (the global one is left alone) with a batch
span processor and the OTLP/HTTP exporter, which read the standard variables:
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` (+ ``/v1/traces``;
default ``http://localhost:4318``), ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*``; the resource
is ``OTEL_SERVICE_NAME`` (default ``datus-queue``) and ``OTEL_RESOURCE_ATTRIBUTES``.

Spans (GenAI semantic conventions for the calls):

- the job run: ``dq.generate`` / ``dq.tool_run`` (kind CONSUMER), a child of the submitter's
  span when the message carries a W3C ``traceparent``; ``dq.job.id``, ``dq.job.kind``,
  ``dq.job.run`` (the store's run number), ``dq.job.status``, ``dq.job.model`` (the name the job asked
  for), ``messaging.destination.name``;
- each model call: ``chat <model>`` (CLIENT): ``gen_ai.operation.name`` = chat,
  ``gen_ai.provider.name`` and ``gen_ai.system``, ``gen_ai.request.model`` (and
  temperature/top_p/max_tokens when set), ``gen_ai.usage.input_tokens`` /
  ``output_tokens`` / ``cache_read.input_tokens``, ``gen_ai.response.finish_reasons``,
  ``gen_ai.response.id``; on an error ``error.type`` and status ERROR;
- each tool call: ``execute_tool <name>`` (INTERNAL): ``gen_ai.operation.name`` =
  execute_tool, ``gen_ai.tool.name``, ``gen_ai.tool.call.id``.

Message content (prompts, answers, tool arguments and results) is left out unless
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``, as the GenAI conventions ask.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from datus_queue.tasks.observability.traces import JobInfo

__all__ = ["PROVIDER_NAMES", "OtelBackend"]

logger = logging.getLogger("datus_queue.tasks.observability.otel_trace")
# gen_ai.provider.name: the conventions' well-known values where there is one
PROVIDER_NAMES = {"openai": "openai", "claude": "anthropic", "gemini": "gcp.gemini", "deepseek": "deepseek",
                  "qwen": "qwen", "fake": "fake"}
_CAPTURE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


class OtelBackend:
    def __init__(self) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "datus-queue"}
        self.provider = TracerProvider(resource=Resource.create(attributes))
        exporter = OTLPSpanExporter()
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("datus-queue")
        self.capture = os.environ.get(_CAPTURE, "").strip().lower() == "true"
        self.propagator = TraceContextTextMapPropagator()
        logger.info("OpenTelemetry tracing on: OTLP/HTTP to %s", getattr(exporter, "_endpoint", "?"))

    def start_job(self, job: JobInfo, carrier: Mapping[str, Any] | None) -> _JobSpan:
        parent = self.propagator.extract(_text_headers(carrier)) if carrier else None
        attributes: dict[str, Any] = {
            "dq.job.id": job.job_id, "dq.job.kind": job.kind, "dq.job.run": job.run,
            "dq.job.model": job.model, "messaging.destination.name": f"llm.{job.provider}",
        }
        if job.batch_id is not None:
            attributes["dq.batch.id"] = job.batch_id
        span = self.tracer.start_span(job.task, context=parent, kind=SpanKind.CONSUMER, attributes=attributes)
        return _JobSpan(self, span)

    def shutdown(self, timeout_s: float) -> None:
        self.provider.force_flush(int(timeout_s * 1000))
        self.provider.shutdown()


class _JobSpan:
    """The job's span, and the observer (`datus.models.observe`) of its calls."""

    def __init__(self, backend: OtelBackend, span: Any) -> None:
        self.backend, self.span = backend, span
        self.context = trace.set_span_in_context(span)

    def model_call(self, call: Any) -> _CallSpan:
        options = call.request.options
        provider = PROVIDER_NAMES.get(call.provider, call.provider)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider, "gen_ai.system": provider,
            "gen_ai.request.model": call.model,
        }
        for name, value in (("temperature", options.temperature), ("top_p", options.top_p),
                            ("max_tokens", options.max_tokens)):
            if value is not None:
                attributes[f"gen_ai.request.{name}"] = value
        if self.backend.capture:
            attributes["gen_ai.input.messages"] = json.dumps(
                [message.model_dump(exclude_defaults=True) for message in call.request.messages], ensure_ascii=False)
        span = self.backend.tracer.start_span(f"chat {call.model}", context=self.context, kind=SpanKind.CLIENT,
                                              attributes=attributes)
        return _CallSpan(span, self.backend.capture, model=True)

    def tool_call(self, call: Any) -> _CallSpan:
        attributes: dict[str, Any] = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": call.name}
        if call.call_id:
            attributes["gen_ai.tool.call.id"] = call.call_id
        if call.server:
            attributes["dq.mcp.server"] = call.server
        if self.backend.capture:
            attributes["gen_ai.tool.call.arguments"] = json.dumps(call.arguments, ensure_ascii=False, default=str)
        span = self.backend.tracer.start_span(f"execute_tool {call.name}", context=self.context,
                                              kind=SpanKind.INTERNAL, attributes=attributes)
        return _CallSpan(span, self.backend.capture, model=False)

    def finish(self, status: str, output: Any, error: Any) -> None:
        self.span.set_attribute("dq.job.status", status)
        if status in ("failed", "dead", "error") or (status == "retrying" and _code(error) not in _WAITS):
            code = _code(error) or status
            self.span.set_attribute("error.type", code)
            self.span.set_status(Status(StatusCode.ERROR, code))
        self.span.end()


# hand-backs that are waits, not failures: the limiter's, and the caller's own tools'
_WAITS = frozenset({"rate_limit_wait", "caller_tool_wait"})


class _CallSpan:
    def __init__(self, span: Any, capture: bool, model: bool) -> None:
        self.span, self.capture, self.model = span, capture, model

    def end(self, result: Any, error: BaseException | None) -> None:
        span = self.span
        if result is None:
            kind = getattr(getattr(error, "code", None), "value", None) or type(error).__name__
            span.set_attribute("error.type", kind)
            span.set_status(Status(StatusCode.ERROR, kind))
        elif self.model:
            usage = result.usage
            span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
            if usage.cached_tokens:
                span.set_attribute("gen_ai.usage.cache_read.input_tokens", usage.cached_tokens)
            if result.finish_reason:
                span.set_attribute("gen_ai.response.finish_reasons", [result.finish_reason])
            if result.response_id:
                span.set_attribute("gen_ai.response.id", result.response_id)
            if self.capture:
                span.set_attribute("gen_ai.output.messages",
                                   json.dumps([result.message().model_dump(exclude_defaults=True)], ensure_ascii=False))
        else:
            if result.is_error:
                span.set_attribute("error.type", "tool_error")
                span.set_status(Status(StatusCode.ERROR, "the tool reported an error"))
            if self.capture:
                span.set_attribute("gen_ai.tool.call.result", result.text)
        span.end()


def _text_headers(carrier: Mapping[str, Any]) -> dict[str, str]:
    return {name: value for name, value in carrier.items()
            if name in ("traceparent", "tracestate") and isinstance(value, str)}


def _code(error: Any) -> str | None:
    if isinstance(error, dict):
        return error.get("code")
    return getattr(error, "code", None)
