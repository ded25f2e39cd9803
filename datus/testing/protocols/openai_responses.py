"""OpenAI's Responses API wire format (``POST /v1/responses``), non-streamed and SSE-streamed.

Shapes follow the official API as the `openai` SDK parses them (`Response`, its output items
``reasoning`` / ``message`` / ``function_call``, `ResponseUsage` with ``input_tokens_details``
and ``output_tokens_details``, the stream's typed events from ``response.created`` to
``response.completed``). Authentication, error bodies, faults and rate-limit headers are the
chat-completions module's: one OpenAI.

Reasoning. A `Reply` with ``reasoning`` answers with a reasoning item first: its summary text
when the request asked for one (``reasoning.summary``), and its ``encrypted_content`` when the
request asked for that (``include: ["reasoning.encrypted_content"]``). Like the real service
with ``store: false``, a request that replays a reasoning item must carry the
``encrypted_content`` this server issued for it, intact, to the same model: otherwise it is
answered 400 (so a test that passes has replayed reasoning faithfully). ``ScriptedRequest.messages`` is the
input rewritten in the chat shape (instructions as a system message, function calls as an
assistant's ``tool_calls``, function-call outputs as ``tool`` messages, an assistant's
replayed reasoning items under ``reasoning_items``), so matchers and the agent fallback read
it as they read any OpenAI request; ``tools`` are the request's own (flat ``name`` /
``parameters``).

Stored responses and ``previous_response_id``. As on the service (API reference, "Create a
model response": ``store`` defaults to true; ``previous_response_id`` "to create multi-turn
conversations"; conversation-state guide), a response made with ``store`` on is kept — here for
the server's lifetime, there for 30 days — with its whole context: its input (resolved through
its own ``previous_response_id``) then its output. A request naming it continues that context
with its own input; an id this server never stored, or one deleted (``DELETE
/v1/responses/{id}``, which the tests use as expiry), is answered 400 ``previous_response_not_found``
("Previous response with id '...' not found.", param ``previous_response_id``), the shape the
service sends. Input items are checked against the resolved context as the service checks them:
an item id already there (a reasoning item replayed on top of the chain that holds it) is
"Duplicate item found with id ..."; a reasoning item with no ``encrypted_content`` must name an
item this server stored ("Item with id '...' not found."); a function-call output needs its
call ("No tool call found for function call output with call_id ...") and a call its output
("No tool output found for function call ..."). So a test that passes has sent a consistent
chain. Unlike the other protocols this one keeps state: the stored responses.

Hosted tools (API reference "Tools"; the web search, file search and code interpreter guides).
A request's ``tools`` may hold OpenAI's own tools (``{"type": "web_search"}``, ``{"type":
"file_search", "vector_store_ids": [...]}`` — required, ``{"type": "code_interpreter",
"container": ...}`` — required). OpenAI runs them inside the one response: a scripted call
named ``web_search`` (``file_search``, ``code_interpreter``) while the request offers that
hosted tool becomes its output item — ``web_search_call`` (``action``: ``search`` with the
call's ``query``; ``sources`` when ``include`` asks for ``web_search_call.action.sources``),
``file_search_call`` (``queries``; ``results`` when asked for), ``code_interpreter_call``
(``code``, ``container_id``; ``outputs`` when asked for) — with canned, deterministic results,
followed by the message, whose text cites the first web source (``url_citation``). Streamed,
each has its ``response.<kind>.in_progress`` / ``searching`` (``interpreting``) /
``completed`` events. Such items replayed in a later input are taken as the assistant's.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from datus.models.scripted import Reply, ScriptedRequest
from datus.testing.protocols import ProtocolError, Usage, estimate_usage, split_text, sse
from datus.testing.protocols.openai_chat import OpenAIChatProtocol, _error

__all__ = ["ENCRYPTED_PREFIX", "OpenAIResponsesProtocol", "decrypt", "encrypt"]

#: Every ``encrypted_content`` this server issues starts so; the rest is base64 of the reasoning.
ENCRYPTED_PREFIX = "gAAAAfake:"


def encrypt(reasoning: str, model: str) -> str:
    payload = json.dumps({"model": model, "reasoning": reasoning}, ensure_ascii=False).encode()
    return ENCRYPTED_PREFIX + base64.b64encode(payload).decode()


def decrypt(content: Any) -> dict[str, Any] | None:
    """What an ``encrypted_content`` this server issued holds; None for anything else."""
    if not isinstance(content, str) or not content.startswith(ENCRYPTED_PREFIX):
        return None
    try:
        value = json.loads(base64.b64decode(content[len(ENCRYPTED_PREFIX):], validate=True))
    except (binascii.Error, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _invalid(message: str, param: str | None = None, code: str | None = None) -> ProtocolError:
    return ProtocolError(_error(400, message, "invalid_request_error", code, param))


@dataclass(frozen=True)
class _ResponsesRequest(ScriptedRequest):
    #: the resolved input items: the previous response's whole context, then this request's input
    context: list[dict[str, Any]] = field(default_factory=list)


class OpenAIResponsesProtocol(OpenAIChatProtocol):
    name = "openai_responses"
    paths = ("/v1/responses", "/responses")

    def __init__(self) -> None:
        # response id -> {"body": the response, "context": its input items then its output items}
        self._stored: dict[str, dict[str, Any]] = {}
        self._items: dict[str, dict[str, Any]] = {}  # every stored response's output items, by id

    def extra_routes(self) -> list[BaseRoute]:
        # /v1/models is the chat-completions module's
        return [Route(path, self._one_response, methods=["GET", "DELETE"])
                for path in ("/v1/responses/{response_id}", "/responses/{response_id}")]

    async def _one_response(self, request: Request) -> Response:
        """``GET`` / ``DELETE /v1/responses/{id}`` on stored responses (API reference: "Get a model
        response", "Delete a model response")."""
        denied = self.authenticate(request, request.app.state.api_key)
        if denied is not None:
            return denied
        response_id = request.path_params["response_id"]
        stored = self._stored.get(response_id)
        if stored is None:
            return _error(404, f"Response with id '{response_id}' not found.", "invalid_request_error", None,
                          "response_id")
        if request.method == "DELETE":
            self.forget(response_id)
            return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
        return JSONResponse(stored["body"])

    def forget(self, response_id: str) -> None:
        """Drop a stored response and its items (as deletion or expiry does on the service)."""
        stored = self._stored.pop(response_id, None)
        for item in (stored or {}).get("output", ()):
            self._items.pop(item.get("id"), None)

    def _keep(self, response: dict[str, Any], request: ScriptedRequest) -> None:
        if response.get("store") is False or response["status"] == "in_progress":
            return
        context = [*getattr(request, "context", ()), *response["output"]]
        self._stored[response["id"]] = {"body": response, "context": context, "output": response["output"]}
        for item in response["output"]:
            self._items[item["id"]] = item

    # -- requests -------------------------------------------------------------------------

    def parse(self, request: Request, body: Any) -> ScriptedRequest:
        if not isinstance(body, dict):
            raise _invalid("Request body must be a JSON object.")
        if not body.get("model"):
            raise _invalid("Missing required parameter: 'model'.", "model", "missing_required_parameter")
        raw = body.get("input")
        if raw is None or raw == [] or raw == "":
            raise _invalid("Missing required parameter: 'input'.", "input", "missing_required_parameter")
        items = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
        if not isinstance(items, list):
            raise _invalid("Invalid 'input': expected a string or an array of items.", "input", "invalid_type")
        chain: list[dict[str, Any]] = []
        previous = body.get("previous_response_id")
        if previous is not None:
            stored = self._stored.get(str(previous))
            if stored is None:
                raise ProtocolError(_error(400, f"Previous response with id '{previous}' not found.",
                                           "invalid_request_error", "previous_response_not_found",
                                           "previous_response_id"))
            chain = stored["context"]
        messages: list[dict[str, Any]] = []
        if body.get("instructions"):  # a previous response's instructions are not carried over
            messages.append({"role": "system", "content": str(body["instructions"])})
        store = body.get("store", True) is not False
        for item in chain:  # this server's own items: nothing to check
            _read_item(item, 0, messages, True, str(body["model"]))
        seen = {str(item["id"]) for item in chain if item.get("id")}
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise _invalid(f"Invalid 'input[{index}]': expected an object.", f"input[{index}]", "invalid_type")
            if item.get("id"):
                if str(item["id"]) in seen:
                    raise _invalid(f"Duplicate item found with id {item['id']}. Remove duplicate items from your "
                                   "input and try again.", "input")
                seen.add(str(item["id"]))
            if item.get("type") == "reasoning" and item.get("encrypted_content") is None and store \
                    and item.get("id") not in self._items:
                raise _invalid(f"Item with id '{item.get('id')}' not found.", "input")
            known = item.get("type") == "reasoning" and item.get("encrypted_content") is None \
                and item.get("id") in self._items
            _read_item(item, index, messages, known, str(body["model"]))
        _check_calls([*chain, *items])
        tools = body.get("tools") or []
        for index, tool in enumerate(tools):
            required = _HOSTED_REQUIRED.get(tool.get("type")) if isinstance(tool, dict) else None
            if required and required not in tool:
                raise _invalid(f"Missing required parameter: 'tools[{index}].{required}'.", f"tools[{index}].{required}",
                               "missing_required_parameter")
            if isinstance(tool, dict) and tool.get("type") == "function" and "function" in tool:
                # the chat-completions spelling is an error here, as on the real service
                raise _invalid(f"Missing required parameter: 'tools[{index}].name'.", f"tools[{index}].name",
                               "missing_required_parameter")
        return _ResponsesRequest(protocol=self.name, model=str(body["model"]), messages=messages,
                                 stream=bool(body.get("stream")), tools=list(tools), body=body,
                                 context=[*chain, *items])

    # -- answers --------------------------------------------------------------------------

    def render_json(self, reply: Reply, request: ScriptedRequest) -> Response:
        body = self._response(reply, request, _output(reply, request), estimate_usage(request, reply))
        self._keep(body, request)
        return JSONResponse(body, headers={"x-request-id": _new_id("req_")})

    def stream_frames(self, reply: Reply, request: ScriptedRequest) -> list[bytes]:
        output = _output(reply, request)
        sequence = iter(range(1_000_000))
        frames: list[bytes] = []

        def event(kind: str, **fields: Any) -> None:
            frames.append(sse({"type": kind, "sequence_number": next(sequence), **fields}, event=kind))

        started = self._response(reply, request, [], None, status="in_progress")
        event("response.created", response=started)
        event("response.in_progress", response=started)
        for index, item in enumerate(output):
            where = {"item_id": item["id"], "output_index": index}
            if item["type"] == "reasoning":
                event("response.output_item.added", output_index=index, item={**item, "summary": []})
                for number, part in enumerate(item["summary"]):
                    event("response.reasoning_summary_part.added", **where, summary_index=number,
                          part={"type": "summary_text", "text": ""})
                    for piece in split_text(part["text"]):
                        event("response.reasoning_summary_text.delta", **where, summary_index=number, delta=piece)
                    event("response.reasoning_summary_text.done", **where, summary_index=number, text=part["text"])
                    event("response.reasoning_summary_part.done", **where, summary_index=number, part=part)
            elif item["type"] == "message":
                event("response.output_item.added", output_index=index,
                      item={**item, "status": "in_progress", "content": []})
                [part] = item["content"]
                event("response.content_part.added", **where, content_index=0,
                      part={**part, "text": ""})
                for piece in split_text(part["text"]):
                    event("response.output_text.delta", **where, content_index=0, delta=piece, logprobs=[])
                event("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[])
                event("response.content_part.done", **where, content_index=0, part=part)
            elif item["type"] in _HOSTED_ITEMS:
                kind = item["type"]
                event("response.output_item.added", output_index=index, item={**item, "status": "in_progress"})
                event(f"response.{kind}.in_progress", **where)
                event(f"response.{kind}.{'interpreting' if kind == 'code_interpreter_call' else 'searching'}",
                      **where)
                event(f"response.{kind}.completed", **where)
            else:
                event("response.output_item.added", output_index=index,
                      item={**item, "status": "in_progress", "arguments": ""})
                for piece in split_text(item["arguments"]):
                    event("response.function_call_arguments.delta", **where, delta=piece)
                event("response.function_call_arguments.done", **where, arguments=item["arguments"])
            event("response.output_item.done", output_index=index, item=item)
        final = self._response(reply, request, output, estimate_usage(request, reply))
        self._keep(final, request)
        event("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)
        return frames

    def malformed_frame(self, request: ScriptedRequest) -> bytes:
        return sse('{"type": "response.output_text.delta", "delta": ', event="response.output_text.delta")

    def _response(self, reply: Reply, request: ScriptedRequest, output: list[dict[str, Any]],
                  usage: Usage | None, status: str | None = None) -> dict[str, Any]:
        body = request.body
        incomplete = None
        if status is None:
            status = "completed"
            if reply.finish_reason in ("length", "content_filter"):
                status = "incomplete"
                incomplete = {"reason": "max_output_tokens" if reply.finish_reason == "length" else "content_filter"}
        text = body.get("text") if isinstance(body.get("text"), dict) else {"format": {"type": "text"}}
        return {
            "id": _new_id("resp_"),
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": request.model,
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"),
                          "summary": (body.get("reasoning") or {}).get("summary")},
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": text,
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": None if usage is None else _usage(usage),
            "user": None,
            "metadata": {},
        }


def _read_item(item: dict[str, Any], index: int, messages: list[dict[str, Any]], known: bool, model: str) -> None:
    """One input item into the chat-shaped ``messages``. ``known``: a reasoning item this server
    stored (or its own context's): nothing to verify."""
    kind = item.get("type") or ("message" if "role" in item else None)
    last = messages[-1] if messages else None
    open_turn = last is not None and last["role"] == "assistant"
    fresh = open_turn and not last["content"] and not last.get("tool_calls")  # type: ignore[index]
    if kind == "reasoning":
        decrypted = decrypt(item.get("encrypted_content"))
        if not known and (decrypted is None or decrypted.get("model") != model):
            if item.get("encrypted_content") is None:
                raise _invalid(f"Item with id '{item.get('id')}' not found. Items are not persisted when `store` "
                               "is set to false. Try again with `store` set to true, or remove this item from "
                               "your input.", f"input[{index}]")
            raise _invalid(f"The encrypted content for item {item.get('id')} could not be verified.",
                           f"input[{index}].encrypted_content", "invalid_encrypted_content")
        if open_turn and fresh:
            last.setdefault("reasoning_items", []).append(item)  # type: ignore[union-attr]
        else:
            messages.append({"role": "assistant", "content": "", "reasoning_items": [item]})
    elif kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise _invalid(f"Invalid 'input[{index}].role': {role!r}.", f"input[{index}].role", "invalid_value")
        content = _text(item.get("content"))
        if role == "assistant" and fresh:
            last["content"] = content  # type: ignore[index]
        else:
            messages.append({"role": role, "content": content})
    elif kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""}}
        if open_turn:
            last.setdefault("tool_calls", []).append(call)  # type: ignore[union-attr]
        else:
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
    elif kind in _HOSTED_ITEMS:  # run by OpenAI within the answer: the assistant's
        if open_turn:
            last.setdefault("hosted_calls", []).append(item)  # type: ignore[union-attr]
        else:
            messages.append({"role": "assistant", "content": "", "hosted_calls": [item]})
    elif kind == "function_call_output":
        output = item.get("output")
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": output if isinstance(output, str) else json.dumps(output)})
    else:
        raise _invalid(f"Invalid 'input[{index}].type': {kind!r}.", f"input[{index}].type", "invalid_value")


def _check_calls(items: list[dict[str, Any]]) -> None:
    """Every function-call output answers a call before it, every call has its output."""
    calls: list[str] = []
    answered: set[str] = set()
    for item in items:
        if item.get("type") == "function_call":
            calls.append(str(item.get("call_id")))
        elif item.get("type") == "function_call_output":
            if str(item.get("call_id")) not in calls:
                raise _invalid(f"No tool call found for function call output with call_id {item.get('call_id')}.",
                               "input")
            answered.add(str(item.get("call_id")))
    for call_id in calls:
        if call_id not in answered:
            raise _invalid(f"No tool output found for function call {call_id}.", "input")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


#: hosted tool -> the parameter its config requires (API reference, "Tools")
_HOSTED_REQUIRED = {"file_search": "vector_store_ids", "code_interpreter": "container"}
#: the output items of hosted tools -> their prefix of ids
_HOSTED_ITEMS = {"web_search_call": "ws_", "file_search_call": "fs_", "code_interpreter_call": "ci_"}


def _hosted(request: ScriptedRequest) -> set[str]:
    """The hosted tools the request offers, by the name a scripted call uses for them."""
    names = set()
    for tool in request.tools:
        kind = str(tool.get("type", "")) if isinstance(tool, dict) else ""
        if kind.startswith("web_search"):  # web_search, web_search_preview, dated versions
            names.add("web_search")
        elif kind in _HOSTED_REQUIRED:
            names.add(kind)
    return names


def _source(query: str) -> dict[str, str]:
    slug = "-".join("".join(c if c.isalnum() else " " for c in query.lower()).split()) or "search"
    return {"type": "url", "url": f"https://example.org/{slug}"}


def _hosted_item(call: Any, include: list[str]) -> dict[str, Any]:
    arguments = call.arguments if isinstance(call.arguments, dict) else {}
    kind = f"{call.name}_call"
    item: dict[str, Any] = {"id": _new_id(_HOSTED_ITEMS[kind]), "type": kind, "status": "completed"}
    if call.name == "web_search":
        query = str(arguments.get("query", ""))
        item["action"] = {"type": "search", "query": query}
        if "web_search_call.action.sources" in include:
            item["action"]["sources"] = [_source(query)]
    elif call.name == "file_search":
        query = str(arguments.get("query", ""))
        item["queries"] = [query]
        item["results"] = [{"file_id": "file-fake0001", "filename": "notes.md", "score": 0.9,
                            "text": f"Notes about {query}.", "attributes": {}}] \
            if "file_search_call.results" in include else None
    else:
        item["code"] = str(arguments.get("code", ""))
        item["container_id"] = "cntr_fake0001"
        item["outputs"] = [{"type": "logs", "logs": "42\n"}] if "code_interpreter_call.outputs" in include else None
    return item


def _output(reply: Reply, request: ScriptedRequest) -> list[dict[str, Any]]:
    body = request.body
    output: list[dict[str, Any]] = []
    hosted = _hosted(request)
    include = list(body.get("include") or [])
    functions = [call for call in reply.tool_calls if call.name not in hosted]
    if reply.reasoning:
        item: dict[str, Any] = {"id": _new_id("rs_"), "type": "reasoning", "summary": []}
        if (body.get("reasoning") or {}).get("summary"):
            item["summary"] = [{"type": "summary_text", "text": reply.reasoning}]
        if "reasoning.encrypted_content" in (body.get("include") or []):
            item["encrypted_content"] = encrypt(reply.reasoning, request.model)
        output.append(item)
    output += [_hosted_item(call, include) for call in reply.tool_calls if call.name in hosted]
    searched = [item["action"]["query"] for item in output if item["type"] == "web_search_call"]
    if reply.text or not functions:
        annotations = [{"type": "url_citation", "start_index": 0, "end_index": len(reply.text),
                        "title": f"About {searched[0]}", "url": _source(searched[0])["url"]}] \
            if searched and reply.text else []
        output.append({"id": _new_id("msg_"), "type": "message", "role": "assistant", "status": "completed",
                       "content": [{"type": "output_text", "text": reply.text, "annotations": annotations,
                                    "logprobs": []}]})
    for call in functions:
        output.append({"id": _new_id("fc_"), "type": "function_call", "status": "completed",
                       "call_id": call.id or _new_id("call_"), "name": call.name,
                       "arguments": call.arguments_json()})
    return output


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }
