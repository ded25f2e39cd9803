"""The providers' batch APIs: the same requests as online calls, sent as a batch at batch prices.

`batch_api(model)` gives the batch API of a model's provider (OpenAI's Files + Batch API,
DashScope's OpenAI-compatible one for Qwen, Anthropic's Message Batches, Gemini's batch mode),
or raises `ModelConfigError` for a provider without one here yet.
It builds each item's request body with the adapter's own request building (`_request`, then
`_params`: exactly what an online call of the same prompt and options sends, minus the client's
timeout), reads each answer with the adapter's own response mapping, prices it at the
provider's batch rates (`pricing.batch_pricing`), and speaks the API on the official sync SDK:

    upload(lines) -> file id        OpenAI only (Anthropic sends the requests in the create)
    create(part_id, lines, file_id) -> provider batch id (``part_id`` in OpenAI's metadata)
    find(part_id, items, since)     a batch this part made whose answer never arrived, or None
    retrieve(id) -> Progress        status, ended, counts
    results(progress) -> Iterator[ItemResult]   by custom_id, in the provider's order
    cancel(id)

SDK errors become `ModelError`s here (the adapter's `_map_error`), as for online calls.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

from datus.models.errors import ModelConfigError, ModelError
from datus.models.generation import Generation
from datus.models.messages import to_messages
from datus.models.pricing import batch_pricing, cost_usd

__all__ = ["BatchAPI", "BatchLimits", "ItemResult", "Progress", "batch_api", "batch_window", "split"]


@dataclass(frozen=True)
class BatchLimits:
    """What one provider batch may hold (the providers' documented limits by default)."""

    max_requests: int
    max_bytes: int


@dataclass(frozen=True)
class Progress:
    provider_batch_id: str
    status: str  # the provider's spelling
    ended: bool
    total: int
    done: int  # answered, either way
    failed: int
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    reported: bool = True  # False: the provider (its SDK) does not say how far the batch is


@dataclass(frozen=True)
class ItemResult:
    """One item's answer: ``generation`` when it succeeded, else ``error_code``/``error``."""

    custom_id: str
    generation: Generation | None = None
    error_code: str | None = None
    error: str | None = None
    online_cost_usd: float | None = None  # what the same tokens cost online
    cache_savings_usd: float | None = None  # what the prompt cache saved, at batch prices


def split(sizes: list[int], limits: BatchLimits, overhead: int = 0) -> list[range]:
    """Consecutive runs of items (by their encoded sizes, plus ``overhead`` bytes per item) that
    each fit ``limits``; an item larger than ``max_bytes`` on its own is a part of its own (the
    provider then refuses it, and it is retried online)."""
    parts: list[range] = []
    start, used = 0, 0
    for index, size in enumerate(sizes):
        size += overhead
        if index > start and (index - start >= limits.max_requests or used + size > limits.max_bytes):
            parts.append(range(start, index))
            start, used = index, 0
        used += size
    if start < len(sizes):
        parts.append(range(start, len(sizes)))
    return parts


class BatchAPI:
    provider_family: ClassVar[str]
    default_limits: ClassVar[BatchLimits]
    # how long the provider may take to answer a batch (its documented turnaround: OpenAI's and
    # DashScope's completion_window "24h", Anthropic's "within 24 hours", Gemini's "24-hour target")
    window: ClassVar[timedelta] = timedelta(hours=24)
    item_overhead: ClassVar[int] = 1  # bytes around each encoded line (a newline, a comma)

    def __init__(self, model: Any) -> None:
        self.model = model
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._create_client()
        return self._client

    def _create_client(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ModelError:
            raise
        except Exception as exc:  # the SDK's: mapped at this one boundary, as online calls are
            raise self.model._map_error(exc) from exc

    # -- requests and answers ---------------------------------------------------------------

    def body(self, prompt: Any, instruction: str | None = None, **options: Any) -> tuple[dict[str, Any], str | None]:
        """The request an online call would send (minus the client's timeout), and what the
        answer's mapping needs to know (Claude's forced JSON tool; None otherwise)."""
        request = self.model._request(to_messages(prompt, instruction), options)
        params, forced = self._params(request)
        params = dict(params)
        params.pop("timeout", None)
        params.update(params.pop("extra_body", None) or {})
        return params, forced

    def _params(self, request: Any) -> tuple[dict[str, Any], str | None]:
        raise NotImplementedError

    def cache_prefix(self, body: dict[str, Any], prefix: str) -> dict[str, Any]:
        """``body`` with ``prefix`` (the start of its prompt that every item shares) made a
        prompt-cache prefix, where the provider wants it marked. By default nothing to do: OpenAI
        and DashScope cache a repeated prefix by themselves (from 1,024 tokens), and the prompt
        already starts with it; Gemini's implicit caching likewise."""
        return body

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def priced(self, custom_id: str, generation: Generation) -> ItemResult:
        """The answer with its cost at batch prices (``usage.cost_usd``) and online (beside it),
        and what the prompt cache saved at batch prices: the same tokens uncached, less what
        they cost (reads at the cache-read rate, writes at the cache-write rate: negative when
        a write was never read back)."""
        model, usage = self.model, generation.usage
        tokens = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                  "cached_tokens": usage.cached_tokens, "cache_write_tokens": usage.cache_write_tokens}
        online = cost_usd(model.pricing, **tokens) if model.pricing is not None else None
        batch_rates = batch_pricing(model.provider, model.pricing)
        update: dict[str, Any] = {"provider": model.provider, "model": model.model_name, "attempts": 1,
                                  "requests": 1, "priced": batch_rates is not None}
        savings = None
        if batch_rates is not None:
            update["cost_usd"] = cost_usd(batch_rates, **tokens)
            savings = cost_usd(batch_rates, input_tokens=usage.input_tokens,
                               output_tokens=usage.output_tokens) - update["cost_usd"]
        generation.usage = usage.model_copy(update=update)
        return ItemResult(custom_id, generation=generation, online_cost_usd=online, cache_savings_usd=savings)


class OpenAIBatchAPI(BatchAPI):
    """OpenAI's Batch API over ``/v1/chat/completions``, or ``/v1/responses`` for a model that
    speaks the Responses API (`datus.models.openai_responses`; the Batch API takes both
    endpoints). DashScope's is the same shape."""

    provider_family = "openai"
    # https://platform.openai.com/docs/guides/batch: 50,000 requests and 200 MB per input file
    default_limits = BatchLimits(max_requests=50_000, max_bytes=200 * 1024 * 1024)

    @property
    def _responses(self) -> Any:
        """The model's Responses-API adapter, or None (Chat Completions)."""
        return getattr(self.model, "_responses", None)

    @property
    def endpoint(self) -> str:
        return "/v1/responses" if self._responses is not None else "/v1/chat/completions"

    def _create_client(self) -> Any:
        import openai

        model = self.model
        return openai.OpenAI(api_key=model._get_api_key(), base_url=model._get_base_url(), max_retries=2,
                             timeout=model.model_config.timeout_s)

    def _params(self, request: Any) -> tuple[dict[str, Any], str | None]:
        if self._responses is not None:  # each item stands alone: never chained to a stored response
            return self._responses.params(request, chain=False), None
        return self.model._params(request), None

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": self.endpoint, "body": body},
                          ensure_ascii=False, separators=(",", ":")).encode()

    def upload(self, lines: list[bytes], name: str) -> str:
        content = b"\n".join(lines) + b"\n"
        return self._call(self.client.files.create, file=(f"{name}.jsonl", content), purpose="batch").id

    def create(self, part_id: str, lines: list[bytes], file_id: str | None) -> str:
        if file_id is None:
            raise ValueError("OpenAI batches are made from an uploaded file: upload first")
        batch = self._call(self.client.batches.create, input_file_id=file_id, endpoint=self.endpoint,
                           completion_window="24h", metadata={"dq_part": part_id[:512]})
        return batch.id

    def find(self, part_id: str, items: int, since: datetime) -> str | None:
        """The batch created for ``part_id`` (its metadata says so), if the create reached OpenAI."""
        for batch in self._call(self.client.batches.list, limit=100):
            if (batch.metadata or {}).get("dq_part") == part_id[:512]:
                return batch.id
            if batch.created_at < since.timestamp() - 60:
                return None
        return None

    def retrieve(self, provider_batch_id: str) -> Progress:
        batch = self._call(self.client.batches.retrieve, provider_batch_id)
        counts = batch.request_counts
        total, completed, failed = (counts.total, counts.completed, counts.failed) if counts else (0, 0, 0)
        ended = batch.status in ("completed", "failed", "expired", "cancelled")
        error = None
        if batch.status == "failed" and batch.errors and batch.errors.data:
            error = "; ".join(f"{e.code}: {e.message}" for e in batch.errors.data[:3])
        return Progress(batch.id, batch.status, ended, total, completed + failed, failed, batch.output_file_id,
                        batch.error_file_id, {"completed": completed, "failed": failed, "total": total,
                                              **({"error": error} if error else {})})  # type: ignore[dict-item]

    def results(self, progress: Progress) -> Iterator[ItemResult]:
        for file_id in (progress.output_file_id, progress.error_file_id):
            if file_id is None:
                continue
            text = self._call(self.client.files.content, file_id).text
            for raw in text.splitlines():
                if raw.strip():
                    yield self._item(json.loads(raw))

    def _item(self, line: dict[str, Any]) -> ItemResult:
        custom_id = str(line.get("custom_id"))
        response, error = line.get("response"), line.get("error")
        if response is None or response.get("status_code") != 200:
            body = (response or {}).get("body") or {}
            detail = body.get("error") if isinstance(body, dict) else None
            code = (error or {}).get("code") or (detail or {}).get("code") or (detail or {}).get("type") \
                or f"http_{(response or {}).get('status_code')}"
            message = (error or {}).get("message") or (detail or {}).get("message") or str(code)
            return ItemResult(custom_id, error_code=str(code), error=str(message))
        try:
            return self.priced(custom_id, self._generation(response["body"]))
        except ModelError as exc:  # a content filter's finish, as online
            return ItemResult(custom_id, error_code=exc.slug, error=exc.reason)

    def _generation(self, body: dict[str, Any]) -> Generation:
        from openai.types.chat import ChatCompletion

        from datus.models.messages import ToolCall
        from datus.models.openai_compatible import _usage_of

        model = self.model
        if self._responses is not None:
            from datus.models.openai_responses import generation_of

            return generation_of(body, provider=model.provider, model=model.model_name)
        response = ChatCompletion.model_validate(body)
        choice = response.choices[0]
        message = choice.message
        model._check_finish(choice.finish_reason)
        return Generation(
            text=message.content or "", reasoning=model._reasoning_of(message),
            tool_calls=[ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments or "{}")
                        for call in (message.tool_calls or [])],
            finish_reason=choice.finish_reason, usage=_usage_of(response.usage), response_id=response.id)

    def cancel(self, provider_batch_id: str) -> None:
        self._call(self.client.batches.cancel, provider_batch_id)


class DashScopeBatchAPI(OpenAIBatchAPI):
    """DashScope's OpenAI-compatible Batch API, for Qwen (the same calls at the model's
    ``base_url``, compatible-mode/v1)."""

    provider_family = "qwen"
    # https://help.aliyun.com/zh/dashscope/developer-reference/openai-batch-interface: at most 50,000
    # requests per batch, an input file of at most 100 MB
    default_limits = BatchLimits(max_requests=50_000, max_bytes=100 * 1024 * 1024)


class AnthropicBatchAPI(BatchAPI):
    """Anthropic's Message Batches."""

    provider_family = "claude"
    # https://docs.claude.com/en/docs/build-with-claude/batch-processing: 100,000 requests or 256 MB
    default_limits = BatchLimits(max_requests=100_000, max_bytes=256 * 1024 * 1024)
    item_overhead = 1  # the comma between requests

    def _create_client(self) -> Any:
        import anthropic

        model = self.model
        return anthropic.Anthropic(api_key=model._get_api_key(), base_url=model.model_config.base_url,
                                   max_retries=2, timeout=model.model_config.timeout_s)

    def _params(self, request: Any) -> tuple[dict[str, Any], str | None]:
        return self.model._params(request)

    def cache_prefix(self, body: dict[str, Any], prefix: str) -> dict[str, Any]:
        """The shared prefix as a content block of its own, marked ``cache_control`` (the 5-minute
        ephemeral kind), ahead of the item's own text in the same user turn: the same text
        as online, in two blocks, so every request of the batch repeats the cached prefix
        exactly. The adapter's breakpoint on the whole turn goes, with a prefix or without
        (it would write each item's whole prompt to the cache, at the write premium, and no
        other item repeats it). Nothing when the model's ``prompt_cache`` is off."""
        from datus.models.claude_messages import EPHEMERAL

        messages = body.get("messages") or []
        if self.model.model_config.prompt_cache != "auto" or len(messages) != 1:
            return body
        content = messages[0].get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        if len(blocks) != 1 or blocks[0].get("type") != "text":
            return body
        text = blocks[0].get("text") or ""
        if not prefix or not text.startswith(prefix):
            return {**body, "messages": [{**messages[0], "content": [{"type": "text", "text": text}]}]}
        split = [{"type": "text", "text": prefix, "cache_control": dict(EPHEMERAL)}]
        if text[len(prefix):]:
            split.append({"type": "text", "text": text[len(prefix):]})
        return {**body, "messages": [{**messages[0], "content": split}]}

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        return json.dumps({"custom_id": custom_id, "params": body}, ensure_ascii=False,
                          separators=(",", ":")).encode()

    def upload(self, lines: list[bytes], name: str) -> str | None:
        return None  # the requests travel in the create

    def create(self, part_id: str, lines: list[bytes], file_id: str | None) -> str:
        requests = [json.loads(line) for line in lines]
        return self._call(self.client.messages.batches.create, requests=requests).id

    def find(self, part_id: str, items: int, since: datetime) -> str | None:
        """Message batches carry no metadata: a batch created since ``since`` with exactly
        ``items`` requests, when there is one and only one such (else None: the part is sent
        again). A heuristic; see docs/architecture.md."""
        found = []
        for batch in self._call(self.client.messages.batches.list, limit=100):
            if batch.created_at.timestamp() < since.timestamp() - 5:
                break
            counts = batch.request_counts
            if sum((counts.processing, counts.succeeded, counts.errored, counts.canceled, counts.expired)) == items:
                found.append(batch.id)
        return found[0] if len(found) == 1 else None

    def retrieve(self, provider_batch_id: str) -> Progress:
        batch = self._call(self.client.messages.batches.retrieve, provider_batch_id)
        c = batch.request_counts
        counts = {"processing": c.processing, "succeeded": c.succeeded, "errored": c.errored,
                  "canceled": c.canceled, "expired": c.expired}
        total = sum(counts.values())
        failed = c.errored + c.canceled + c.expired
        return Progress(batch.id, batch.processing_status, batch.processing_status == "ended", total,
                        total - c.processing, failed, counts=counts)

    def results(self, progress: Progress) -> Iterator[ItemResult]:
        forced = None  # dq batch asks for text, never a forced JSON tool
        for entry in self._call(self.client.messages.batches.results, progress.provider_batch_id):
            result = entry.result
            if result.type == "succeeded":
                try:
                    generation = self.model._generation(result.message.to_dict(), forced)
                except ModelError as exc:  # a refusal, as online
                    yield ItemResult(entry.custom_id, error_code=exc.slug, error=exc.reason)
                    continue
                yield self.priced(entry.custom_id, generation)
            elif result.type == "errored":
                error = result.error.error
                yield ItemResult(entry.custom_id, error_code=error.type, error=error.message)
            else:  # canceled, expired
                yield ItemResult(entry.custom_id, error_code=f"batch_{result.type}",
                                 error=f"the provider's batch {result.type} this request")

    def cancel(self, provider_batch_id: str) -> None:
        self._call(self.client.messages.batches.cancel, provider_batch_id)


class GeminiBatchAPI(BatchAPI):
    """Gemini's batch mode (google-genai ``client.batches``), with inline requests; the
    request is the adapter's ``generate_content`` arguments (`_arguments`), the answer read by
    its `ResponseFolder`. The batch's ``display_name`` is the part id (how `find` knows it).
    Its stats are not in the SDK's `BatchJob`: progress is not reported (the bar says so)."""

    provider_family = "gemini"
    # https://ai.google.dev/gemini-api/docs/batch-mode: inline requests while their total stays under
    # 20 MB (larger batches go through an uploaded file, not written here); the request count is ours
    default_limits = BatchLimits(max_requests=50_000, max_bytes=20 * 1024 * 1024)
    _ENDED = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")

    def _create_client(self) -> Any:
        from google import genai
        from google.genai import types

        from datus.models.gemini_model import split_api_version

        model = self.model
        base_url, api_version = split_api_version(model.model_config.base_url, model.API_VERSION)
        options = types.HttpOptions(base_url=base_url, api_version=api_version,
                                    timeout=int(model.model_config.timeout_s * 1000))
        return genai.Client(vertexai=False, api_key=model._get_api_key(), http_options=options)

    def body(self, prompt: Any, instruction: str | None = None, **options: Any) -> tuple[dict[str, Any], str | None]:
        arguments = self.model._arguments(self.model._request(to_messages(prompt, instruction), options))
        config = arguments["config"].model_dump(mode="json", exclude_none=True,
                                                exclude={"http_options", "automatic_function_calling"})
        contents = [content.model_dump(mode="json", exclude_none=True) for content in arguments["contents"]]
        return {"contents": contents, "config": config}, None

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        return json.dumps({"key": custom_id, **body}, ensure_ascii=False, separators=(",", ":")).encode()

    def upload(self, lines: list[bytes], name: str) -> str | None:
        return None  # inline requests travel in the create

    def create(self, part_id: str, lines: list[bytes], file_id: str | None) -> str:
        from google.genai import types

        requests = []
        for raw in lines:
            entry = json.loads(raw)
            requests.append(types.InlinedRequest(contents=entry["contents"], metadata={"key": entry["key"]},
                                                 config=types.GenerateContentConfig(**entry["config"])))
        batch = self._call(self.client.batches.create, model=self.model.model_name, src=requests,
                           config={"display_name": part_id[:128]})
        return batch.name

    def find(self, part_id: str, items: int, since: datetime) -> str | None:
        for batch in self._call(self.client.batches.list, config={"page_size": 100}):
            if batch.display_name == part_id[:128]:
                return batch.name
        return None

    def retrieve(self, provider_batch_id: str) -> Progress:
        batch = self._call(self.client.batches.get, name=provider_batch_id)
        state = getattr(batch.state, "value", str(batch.state))
        self._last = batch  # the inline answers ride on the batch itself
        return Progress(batch.name, state, state in self._ENDED, 0, 0, 0, reported=False)

    def results(self, progress: Progress) -> Iterator[ItemResult]:
        from datus.models.gemini_contents import ResponseFolder

        batch = getattr(self, "_last", None)
        if batch is None or batch.name != progress.provider_batch_id:
            batch = self._call(self.client.batches.get, name=progress.provider_batch_id)
        for entry in (batch.dest.inlined_responses if batch.dest else None) or []:
            custom_id = str((entry.metadata or {}).get("key"))
            if entry.response is None:  # the SDK's JobError: a google.rpc.Status (code, message)
                code = getattr(entry.error, "code", None)
                message = getattr(entry.error, "message", None) or "no answer"
                yield ItemResult(custom_id, error_code=f"http_{code}" if code else "batch_error", error=str(message))
                continue
            folder = ResponseFolder(self.model.provider, self.model.model_name)
            folder.add(entry.response)
            try:
                generation = folder.result()
            except ModelError as exc:  # a safety block, as online
                yield ItemResult(custom_id, error_code=exc.slug, error=exc.reason)
                continue
            yield self.priced(custom_id, generation)

    def cancel(self, provider_batch_id: str) -> None:
        self._call(self.client.batches.cancel, name=provider_batch_id)


_APIS: dict[str, type[BatchAPI]] = {"openai": OpenAIBatchAPI, "claude": AnthropicBatchAPI, "qwen": DashScopeBatchAPI,
                                    "gemini": GeminiBatchAPI}


def batch_window(provider: str) -> timedelta | None:
    """How long ``provider``'s batch API may take to answer a batch; None: it has none here."""
    cls = _APIS.get(provider)
    return None if cls is None else cls.window


def batch_api(model: Any) -> BatchAPI:
    """The batch API of ``model``'s provider."""
    cls = _APIS.get(model.provider)
    if cls is None:
        raise ModelConfigError(
            f"--via batch-api: {model.provider} has no batch API here yet (done: {', '.join(sorted(_APIS))}; "
            "DeepSeek has none)", provider=model.provider,
            model=model.model_name)
    return cls(model)
