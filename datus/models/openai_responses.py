"""OpenAI's Responses API (``POST /v1/responses``), both ways, for `OpenAIModel`.

An OpenAI model speaks it when its config says ``api: responses``, or — ``api`` unset — when
the model answers only there (`needs_responses_api`: the ``-pro`` reasoning models such as
``o1-pro``, ``o3-pro``, ``gpt-5-pro``, and the ``codex`` models). Everything else stays on Chat
Completions (`datus.models.openai_compatible`), which is the default.

Requests. Neutral ``ChatMessage``s become input items::

    system, user   {"role": "system"|"user", "content": <text>}
    assistant      its reasoning items, replayed as they came (``reasoning_details`` entries of
                   type "reasoning": id, summary, encrypted_content), then
                   {"role": "assistant", "content": <text>} when it said something, then one
                   {"type": "function_call", "call_id", "name", "arguments"} per tool call
    tool           {"type": "function_call_output", "call_id", "output": <text>}

``store`` is false unless the model's config (``store: true``) or the call's ``extra_body``
says otherwise: OpenAI keeps nothing, and a reasoning model's items come back with
``encrypted_content`` (``include: ["reasoning.encrypted_content"]``, asked for whatever
``store`` says), which is what the next turn of a tool run sends back.

``previous_response_id``. With ``store`` on, each answer's assistant message also carries a
``reasoning_details`` entry of type ``openai_response``: the response's id, the model, and a
digest of the whole input it answered (never sent). A later request — the next turn of a tool
run, a resumed run (the journal holds the message), the next question of a session — whose
conversation holds such a message, and whose items before it still have that digest, sends
``previous_response_id`` and only the items after it: OpenAI holds the rest, reasoning items
included. Anything else (the digest differs: a session cut or edited, another system prompt;
no entry: an answer made with ``store`` off, or by another model) is sent whole. So is a
request the service answers 400 ``previous_response_not_found`` (deleted, expired after 30
days, another project's key): it is sent again at once, whole — which is why the encrypted
reasoning is asked for even when stored, so that the whole conversation still carries it.
Reasoning items ride in ``ChatMessage.reasoning_details`` — the carrier Claude's thinking
blocks and Gemini's thought signatures use — so the tool loop's conversation, a run's
journal (resume from checkpoints) and sessions keep and replay them with no code of their
own. The Claude and Gemini builders ignore entries of this type, the chat-completions
builder ignores ``reasoning_details`` altogether.

Hosted tools. OpenAI's own tools (``web_search``, ``file_search``, ``code_interpreter``) come
from the model's config (``hosted_tools``: each entry sent as written, beside the function
tools) and are run by OpenAI inside the response, never by this project's loop; their results
are asked for (``include``: ``web_search_call.action.sources``, ``file_search_call.results``,
``code_interpreter_call.outputs``). Each of their output items (``web_search_call``, …) is kept
verbatim in ``reasoning_details`` as an entry of type ``hosted_tool_call`` — with the
provider-neutral ``name``, ``call_id``, ``status``, ``input`` and ``output`` that the tool loop
turns into a TOOL step, and ``model``/``follows`` as for reasoning items — and is replayed,
where it was among the answer's items, to the same model on every later request sent whole
(a chained request has it at OpenAI already).

Answers. A whole ``Response`` — returned, or the one ``response.completed`` (or
``response.incomplete``) carries at the end of a stream — becomes a ``Generation`` through
one mapping (`generation_of`), so streaming and non-streaming cannot drift apart; the stream's
``response.output_text.delta`` and ``response.reasoning_summary_text.delta`` events are the
deltas on the way. ``response.failed`` and ``error`` events become the error tree's classes by
their codes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal

from datus.models.errors import (
    ContentFilterError,
    InvalidResponseError,
    ModelError,
    error_from_status,
)
from datus.models.generation import Generation, ModelRequest, StreamDelta
from datus.models.messages import ChatMessage, ToolCall
from datus.models.openai_compatible import _add_system_hint, _json_hint, _schema_name
from datus.models.rate_limit_headers import openai_budget
from datus.models.usage import Usage

__all__ = [
    "HOSTED_DETAIL",
    "REASONING_DETAIL",
    "RESPONSE_DETAIL",
    "ResponsesAPI",
    "generation_of",
    "needs_responses_api",
    "responses_params",
    "usage_of",
    "wire_input",
]

logger = logging.getLogger(__name__)

ApiName = Literal["chat_completions", "responses"]
#: The ``reasoning_details`` entries that are Responses API reasoning items.
REASONING_DETAIL = "reasoning"
#: The ``reasoning_details`` entry naming the stored response an assistant message came from.
RESPONSE_DETAIL = "openai_response"
#: The ``reasoning_details`` entries that are calls of a tool the provider ran (the tool loop's name).
HOSTED_DETAIL = "hosted_tool_call"
# A hosted call's output item -> the tool's name
_HOSTED_CALLS = {"web_search_call": "web_search", "file_search_call": "file_search",
                 "code_interpreter_call": "code_interpreter"}
# What to ask for so a hosted call's item holds its results
_HOSTED_INCLUDE = {"web_search": "web_search_call.action.sources", "file_search": "file_search_call.results",
                   "code_interpreter": "code_interpreter_call.outputs"}
# Models that answer only on the Responses API: the -pro reasoning models and the codex models.
_RESPONSES_ONLY = re.compile(r"^(o\d+|gpt-[\w.]+?)-pro(-|$)|codex", re.IGNORECASE)
# What a replayed reasoning item keeps (the API rejects output-only fields such as a null status).
_REASONING_KEYS = ("type", "id", "summary", "encrypted_content", "content")
# The codes a failed response or an ``error`` event carries -> the HTTP status that says the same.
_CODE_STATUS = {
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "server_error": 500,
    "server_is_overloaded": 503,
    "slow_down": 503,
    "invalid_prompt": 400,
    "context_length_exceeded": 400,
    "content_filter": 400,
    "invalid_api_key": 401,
    "model_not_found": 404,
}


def needs_responses_api(model: str) -> bool:
    """Whether ``model`` answers only on the Responses API (o1-pro, o3-pro, gpt-5-pro, codex)."""
    return bool(_RESPONSES_ONLY.search(model.split("/")[-1]))


def api_of(configured: str | None, model: str) -> ApiName:
    if configured in ("responses", "chat_completions"):
        return configured  # type: ignore[return-value]
    return "responses" if needs_responses_api(model) else "chat_completions"


# ---- requests ---------------------------------------------------------------------------


def wire_input(messages: Sequence[ChatMessage], model: str | None = None) -> list[dict[str, Any]]:
    """The input items for a conversation (see the module docstring). Reasoning items another
    model produced (a session continued on a different model) are left out: encrypted
    reasoning is only for the model that wrote it."""
    items: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "tool":
            items.append({"type": "function_call_output", "call_id": message.tool_call_id or "",
                          "output": message.content})
        elif message.role != "assistant":
            items.append({"role": message.role, "content": message.content})
        else:
            said: list[dict[str, Any]] = []
            if message.content or not message.tool_calls:
                said.append({"role": "assistant", "content": message.content})
            said += [{"type": "function_call", "call_id": call.id, "name": call.name,
                      "arguments": call.arguments or "{}"} for call in message.tool_calls]
            # each reasoning item and hosted call back where it was: before the item that followed
            # it in the answer (``follows``: how many text and call items came before it; none said: first)
            replayed = [detail for detail in message.reasoning_details or ()
                        if (detail.get("type") == REASONING_DETAIL
                            or (detail.get("type") == HOSTED_DETAIL and isinstance(detail.get("item"), Mapping)))
                        and (model is None or detail.get("model") in (None, model))]
            for index, item in enumerate(said + [None]):
                items += [_reasoning_item(detail) if detail["type"] == REASONING_DETAIL else dict(detail["item"])
                          for detail in replayed if min(_follows(detail), len(said)) == index]
                if item is not None:
                    items.append(item)
    return items


def _follows(detail: Mapping[str, Any]) -> int:
    value = detail.get("follows")
    return value if isinstance(value, int) and value >= 0 else 0


def _reasoning_item(detail: Mapping[str, Any]) -> dict[str, Any]:
    item = {key: detail[key] for key in _REASONING_KEYS if detail.get(key) is not None}
    item.setdefault("summary", [])
    if not item.get("content"):
        item.pop("content", None)
    return item


def input_digest(messages: Sequence[ChatMessage], model: str) -> str:
    """A digest of the input items ``messages`` make for ``model``: what a stored response answered."""
    text = json.dumps(wire_input(messages, model), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def chain_point(messages: Sequence[ChatMessage], model: str) -> tuple[str, int] | None:
    """``(response id, index)`` of the latest assistant message that a stored response of
    ``model`` made, when the messages before it are still the input that response answered;
    None when there is none (the conversation is then sent whole)."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        for detail in message.reasoning_details or () if message.role == "assistant" else ():
            if detail.get("type") == RESPONSE_DETAIL and detail.get("model") == model and detail.get("id"):
                if detail.get("input") == input_digest(messages[:index], model):
                    return str(detail["id"]), index
                return None
    return None


def responses_params(request: ModelRequest, model: str, *, temperature: bool, reasoning: bool,
                     json_schema: bool = True, store: bool = False, chain: bool = True,
                     hosted_tools: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The keyword arguments of ``client.responses.create`` for ``request``. ``temperature``:
    the model takes temperature/top_p; ``reasoning``: it is a reasoning model (its encrypted
    reasoning is asked for); ``store``: the model's default (a call's ``extra_body`` wins);
    ``chain``: with ``store`` on, continue a stored response with ``previous_response_id``
    where the conversation allows (`chain_point`); ``hosted_tools``: OpenAI's own tools, sent
    as given."""
    options = request.options
    extra_body: dict[str, Any] = dict(options.extra_body or {})
    store = bool(extra_body.pop("store", store))
    items = wire_input(request.messages, model)
    params: dict[str, Any] = {"model": model, "input": items, "store": store}
    include = ["reasoning.encrypted_content"] if reasoning else []
    include += [_HOSTED_INCLUDE[name] for name in dict.fromkeys(_hosted_name(tool) for tool in hosted_tools)
                if name in _HOSTED_INCLUDE]
    if include:
        params["include"] = include
    if reasoning and options.enable_thinking:
        params["reasoning"] = {"summary": "auto"}
    if temperature:
        if options.temperature is not None:
            params["temperature"] = options.temperature
        if options.top_p is not None:
            params["top_p"] = options.top_p
    if options.max_tokens is not None:
        params["max_output_tokens"] = options.max_tokens
    if options.stop or options.seed is not None:
        logger.debug("%s: the Responses API takes no stop sequences or seed; not sent", model)
    if options.timeout_s is not None:
        params["timeout"] = options.timeout_s
    fmt = request.json_format
    if fmt is not None:
        if fmt.schema is not None and json_schema:
            params["text"] = {"format": {"type": "json_schema", "name": _schema_name(fmt.name),
                                         "schema": fmt.schema, "strict": fmt.strict}}
        else:
            params["text"] = {"format": {"type": "json_object"}}
            _add_system_hint(items, _json_hint(fmt.schema))
            chain = False  # the hint rides on the first item: not in a chain's new items
    if request.tools or hosted_tools:
        # strict: False — the API's default is strict, which MCP tools' schemas rarely satisfy
        params["tools"] = [{"type": "function", "name": tool.name, "description": tool.description,
                            "parameters": tool.parameters, "strict": False} for tool in request.tools]
        params["tools"] += [dict(tool) for tool in hosted_tools]
        if options.tool_choice in ("auto", "none", "required"):
            params["tool_choice"] = options.tool_choice
        elif options.tool_choice:
            params["tool_choice"] = {"type": "function", "name": options.tool_choice}
    if store and chain and "previous_response_id" not in extra_body:
        point = chain_point(request.messages, model)
        if point is not None:
            params["previous_response_id"] = point[0]
            params["input"] = wire_input(request.messages[point[1] + 1:], model)
    if extra_body:
        params["extra_body"] = extra_body
    return params


def _hosted_name(tool: Mapping[str, Any]) -> str:
    kind = str(tool.get("type", ""))
    return "web_search" if kind.startswith("web_search") else kind


def _previous_gone(exc: BaseException) -> bool:
    """The service's answer to a ``previous_response_id`` it does not hold (API error code
    ``previous_response_not_found``, HTTP 400)."""
    return getattr(exc, "code", None) == "previous_response_not_found" or (
        getattr(exc, "param", None) == "previous_response_id" and getattr(exc, "status_code", None) in (400, 404))


# ---- answers ----------------------------------------------------------------------------


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    value = getattr(obj, name, None)
    if value is None:
        extra = getattr(obj, "model_extra", None) or {}
        value = extra.get(name)
    return default if value is None else value


def _plain(obj: Any) -> Any:
    """An SDK model (or anything) as plain JSON data."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json", exclude_none=True)
    return obj


def usage_of(usage: Any) -> Usage:
    if usage is None:
        return Usage()
    input_details = _get(usage, "input_tokens_details")
    output_details = _get(usage, "output_tokens_details")
    return Usage(
        input_tokens=_get(usage, "input_tokens", 0) or 0,
        output_tokens=_get(usage, "output_tokens", 0) or 0,
        cached_tokens=_get(input_details, "cached_tokens", 0) or 0,
        reasoning_tokens=_get(output_details, "reasoning_tokens", 0) or 0,
    )


def generation_of(response: Any, *, provider: str, model: str, rate_limits: Any = None) -> Generation:
    """A whole ``Response`` (an SDK object or its JSON) as a ``Generation``; a failed one, or
    one the content filter stopped, raises."""
    status = _get(response, "status")
    if status == "failed":
        raise response_error(_get(response, "error") or {}, provider=provider, model=model)
    finish_reason: str | None = None
    if status == "incomplete":
        reason = _get(_get(response, "incomplete_details"), "reason")
        if reason == "content_filter":
            raise ContentFilterError("the provider's content filter stopped the answer", provider=provider,
                                     model=model)
        finish_reason = "length"
    text: list[str] = []
    summaries: list[str] = []
    details: list[dict[str, Any]] = []
    calls: list[ToolCall] = []
    for item in _get(response, "output", []) or []:
        kind = _get(item, "type")
        if kind == "reasoning":
            detail = {key: value for key, value in (_plain(item) or {}).items() if key in _REASONING_KEYS}
            detail["type"] = REASONING_DETAIL
            detail["model"] = model  # whose it is: replayed to this model only (not sent)
            detail["follows"] = len(calls) + bool("".join(text))  # its place among the answer's items (not sent)
            details.append(detail)
            summaries += [str(_get(part, "text", "")) for part in _get(item, "summary", []) or []]
        elif kind == "message":
            for part in _get(item, "content", []) or []:
                if _get(part, "type") == "output_text":
                    text.append(str(_get(part, "text", "")))
                elif _get(part, "type") == "refusal":
                    text.append(str(_get(part, "refusal", "")))
        elif kind in _HOSTED_CALLS:
            details.append(_hosted_detail(_plain(item) or {}, model, len(calls) + bool("".join(text))))
        elif kind == "function_call":
            calls.append(ToolCall(id=str(_get(item, "call_id") or _get(item, "id") or ""),
                                  name=str(_get(item, "name") or ""),
                                  arguments=_get(item, "arguments") or "{}"))
    if finish_reason is None:
        finish_reason = "tool_calls" if calls else "stop"
    summary = "\n\n".join(part for part in summaries if part)
    return Generation(
        text="".join(text),
        reasoning=summary or None,
        reasoning_details=details or None,
        tool_calls=calls,
        finish_reason=finish_reason,
        usage=usage_of(_get(response, "usage")),
        response_id=_get(response, "id"),
        rate_limits=rate_limits,
    )


def _hosted_detail(item: dict[str, Any], model: str, follows: int) -> dict[str, Any]:
    """A hosted call's output item as a ``reasoning_details`` entry: verbatim (``item``, replayed)
    and in the tool loop's neutral terms (``name``, ``input``, ``output``)."""
    name = _HOSTED_CALLS[item["type"]]
    if name == "web_search":
        action = dict(item.get("action") or {})
        sources = action.pop("sources", None)
        step_input, step_output = action, {"sources": sources or []}
    elif name == "file_search":
        step_input, step_output = {"queries": item.get("queries") or []}, {"results": item.get("results") or []}
    else:
        step_input = {"code": item.get("code"), "container_id": item.get("container_id")}
        step_output = {"outputs": item.get("outputs") or []}
    return {"type": HOSTED_DETAIL, "name": name, "call_id": item.get("id"), "status": item.get("status"),
            "input": step_input, "output": step_output, "item": item, "model": model, "follows": follows}


def response_error(error: Any, *, provider: str, model: str) -> ModelError:
    """A failed response's ``error`` (or an ``error`` stream event) in the error tree."""
    code = _get(error, "code")
    message = str(_get(error, "message") or code or "the response failed")
    status = _CODE_STATUS.get(str(code), 500)
    return error_from_status(status, message, codes=(None if code is None else str(code),),
                             provider=provider, model=model)


# ---- the adapter ------------------------------------------------------------------------


class ResponsesAPI:
    """`OpenAIModel`'s requests on the Responses API: its ``_complete`` and ``_stream`` when
    the model's ``api`` is ``responses``. Errors are the SDK's, mapped by the model's own
    ``_map_error`` (the same ``openai`` exceptions as Chat Completions)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def params(self, request: ModelRequest, chain: bool = True) -> dict[str, Any]:
        profile = self.model.profile
        return responses_params(request, self.model.model_name, temperature=profile.temperature,
                                reasoning=profile.always_reasons, json_schema=profile.json_schema,
                                store=bool(getattr(self.model.model_config, "store", False)), chain=chain,
                                hosted_tools=getattr(self.model.model_config, "hosted_tools", None) or ())

    def _where(self) -> dict[str, str]:
        return {"provider": self.model.provider, "model": self.model.model_name}

    async def _create(self, create: Any, request: ModelRequest, **extra: Any) -> tuple[Any, dict[str, Any]]:
        """``create`` with the request's params; a chained request whose previous response the
        service no longer holds is sent again at once, whole (not a retry: nothing failed)."""
        params = self.params(request)
        try:
            return await create(**params, **extra), params
        except Exception as exc:
            if "previous_response_id" not in params or not _previous_gone(exc):
                raise
            logger.info("%s: previous response %s is gone; the conversation is sent whole", self.model.model_name,
                        params["previous_response_id"])
            params = self.params(request, chain=False)
            return await create(**params, **extra), params

    def _stored(self, generation: Generation, request: ModelRequest, params: Mapping[str, Any]) -> Generation:
        """With ``store`` on, the answer names its response for a later ``previous_response_id``."""
        hinted = (params.get("text") or {}).get("format", {}).get("type") == "json_object"  # its context differs
        if params.get("store") and generation.response_id and not hinted:
            model = self.model.model_name
            generation.reasoning_details = [*(generation.reasoning_details or ()), {
                "type": RESPONSE_DETAIL, "id": generation.response_id, "model": model,
                "input": input_digest(request.messages, model)}]
        return generation

    async def complete(self, client: Any, request: ModelRequest) -> Generation:
        raw, params = await self._create(client.responses.with_raw_response.create, request)
        response = raw.parse()
        if _get(response, "output") is None:
            raise InvalidResponseError("the response has no output", **self._where())
        generation = generation_of(response, rate_limits=openai_budget(raw.headers), **self._where())
        return self._stored(generation, request, params)

    async def stream(self, client: Any, request: ModelRequest) -> AsyncIterator[StreamDelta | Generation]:
        stream, params = await self._create(client.responses.create, request, stream=True)
        final: Any = None
        try:
            async for event in stream:
                kind = _get(event, "type")
                if kind == "response.output_text.delta":
                    if delta := _get(event, "delta", ""):
                        yield StreamDelta(text=delta)
                elif kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
                    if delta := _get(event, "delta", ""):
                        yield StreamDelta(reasoning=delta)
                elif kind in ("response.completed", "response.incomplete", "response.failed"):
                    final = _get(event, "response")
                    break
                elif kind == "error":
                    raise response_error(event, **self._where())
        finally:
            await stream.close()
        if final is None:
            raise InvalidResponseError("the stream ended before the response was complete", **self._where())
        headers = getattr(getattr(stream, "response", None), "headers", None)
        yield self._stored(generation_of(final, rate_limits=openai_budget(headers), **self._where()), request, params)

    def count_extra_tokens(self, request: ModelRequest) -> int:
        """Tokens the base count cannot see: replayed encrypted reasoning (opaque; about four
        base64 characters a token) and hosted calls — an estimate for the limiter's reservation."""
        chars = sum(len(str(detail.get("encrypted_content") or "")) if detail.get("type") == REASONING_DETAIL
                    else len(json.dumps(detail.get("item"), ensure_ascii=False))
                    for message in request.messages for detail in message.reasoning_details or ()
                    if detail.get("type") in (REASONING_DETAIL, HOSTED_DETAIL))
        return -(-chars // 4)

