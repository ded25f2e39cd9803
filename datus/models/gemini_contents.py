"""Conversions between the neutral request/answer types and google-genai's: messages to
``contents`` plus a ``GenerateContentConfig``, and ``GenerateContentResponse`` objects back
to a ``Generation``.

One ``ResponseFolder`` folds both the single response of ``generateContent`` and the chunks
of ``streamGenerateContent``, so streaming and non-streaming give the same answer.

google-genai is imported inside the functions, never at module import.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import TYPE_CHECKING, Any

from datus.models.errors import ContentFilterError, InvalidResponseError
from datus.models.generation import Generation, ModelRequest, StreamDelta
from datus.models.messages import ChatMessage, ToolCall
from datus.models.usage import Usage

if TYPE_CHECKING:
    from google.genai import types

    from datus.models.profiles import ModelProfile

__all__ = ["SIGNATURE_DETAIL", "ResponseFolder", "build_config", "to_contents", "usage_of"]

# The `reasoning_details` entry that carries a Gemini thought signature: Gemini wants the
# signature back on the same part (a function call, or the text) in the next turn.
SIGNATURE_DETAIL = "gemini_thought_signature"

# Finish reasons that mean a safety or policy filter cut the answer.
_FILTER_FINISH = frozenset({
    "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "MODEL_ARMOR",
})
_FINISH_NAMES = {"MAX_TOKENS": "length"}
_TOOL_CHOICE = {"auto": "AUTO", "none": "NONE", "required": "ANY"}


# ---- request -------------------------------------------------------------------------------


def to_contents(messages: list[ChatMessage]) -> tuple[str | None, list[types.Content]]:
    """``(system_instruction, contents)``: system messages are joined into the instruction;
    assistant turns become role ``model``; tool results become ``function_response`` parts in
    a user turn; consecutive turns of one role are merged (Gemini wants them alternating)."""
    from google.genai import types

    system: list[str] = []
    contents: list[types.Content] = []
    names_by_id: dict[str, str] = {}
    for message in messages:
        if message.role == "system":
            if message.content:
                system.append(message.content)
            continue
        if message.role == "assistant":
            role, parts = "model", _model_parts(message)
            names_by_id.update({call.id: call.name for call in message.tool_calls})
        elif message.role == "tool":
            name = message.name or names_by_id.get(message.tool_call_id or "", "")
            response = types.FunctionResponse(id=message.tool_call_id or None, name=name,
                                              response={"output": message.content})
            role, parts = "user", [types.Part(function_response=response)]
        else:
            role, parts = "user", [types.Part(text=message.content)] if message.content else []
        if not parts:
            continue
        if contents and contents[-1].role == role:
            contents[-1].parts = [*(contents[-1].parts or []), *parts]
        else:
            contents.append(types.Content(role=role, parts=parts))
    return ("\n\n".join(system) or None), contents


def _model_parts(message: ChatMessage) -> list[types.Part]:
    from google.genai import types

    signatures = {
        detail.get("tool_call_id"): detail["signature"]
        for detail in message.reasoning_details or []
        if detail.get("type") == SIGNATURE_DETAIL and detail.get("signature")
    }
    parts: list[types.Part] = []
    if message.content or None in signatures:
        parts.append(types.Part(text=message.content, thought_signature=_unb64(signatures.get(None))))
    for call in message.tool_calls:
        function_call = types.FunctionCall(id=call.id or None, name=call.name, args=_arguments(call))
        parts.append(types.Part(function_call=function_call, thought_signature=_unb64(signatures.get(call.id))))
    return parts


def _arguments(call: ToolCall) -> dict[str, Any]:
    try:
        return call.parsed_arguments()
    except ValueError:
        # Broken arguments the model produced earlier still have to go back as an object.
        return {"arguments": call.arguments}


def build_config(request: ModelRequest, profile: ModelProfile, system: str | None) -> types.GenerateContentConfig:
    from google.genai import types

    options = request.options
    config: dict[str, Any] = {
        # We pass declarations, not callables, but say so: the SDK must never run a tool loop.
        "automatic_function_calling": types.AutomaticFunctionCallingConfig(disable=True),
    }
    if profile.temperature:
        config.update(temperature=options.temperature, top_p=options.top_p)
    config.update(max_output_tokens=options.max_tokens, stop_sequences=options.stop or None, seed=options.seed)
    if options.enable_thinking:
        # Without the flag the model's own default applies (some Gemini models cannot stop
        # thinking, and a zero budget is an error there); thoughts are then not returned.
        config["thinking_config"] = types.ThinkingConfig(include_thoughts=True,
                                                         thinking_budget=options.thinking_budget)
    fmt = request.json_format
    if fmt is not None:
        config["response_mime_type"] = "application/json"
        if fmt.schema is not None and profile.json_schema:
            # response_json_schema takes a JSON schema as it is ($defs, anyOf, titles);
            # response_schema would need Gemini's own Schema subset.
            config["response_json_schema"] = fmt.schema
        elif fmt.schema is not None:
            hint = "Reply with a JSON object matching this JSON schema:\n" + json.dumps(fmt.schema, ensure_ascii=False)
            system = f"{system}\n\n{hint}" if system else hint
    if request.tools:
        declarations = [types.FunctionDeclaration(name=tool.name, description=tool.description,
                                                  parameters_json_schema=tool.parameters)
                        for tool in request.tools]
        config["tools"] = [types.Tool(function_declarations=declarations)]
        if options.tool_choice:
            mode = _TOOL_CHOICE.get(options.tool_choice, "ANY")
            allowed = None if options.tool_choice in _TOOL_CHOICE else [options.tool_choice]
            config["tool_config"] = types.ToolConfig(function_calling_config=types.FunctionCallingConfig(
                mode=mode, allowed_function_names=allowed))
    http: dict[str, Any] = {}
    if options.timeout_s is not None:
        http["timeout"] = int(options.timeout_s * 1000)  # HttpOptions.timeout is in milliseconds
    if options.extra_body:
        http["extra_body"] = options.extra_body
    if http:
        config["http_options"] = types.HttpOptions(**http)
    config["system_instruction"] = system
    return types.GenerateContentConfig(**{key: value for key, value in config.items() if value is not None})


# ---- answer --------------------------------------------------------------------------------


def usage_of(metadata: Any) -> Usage:
    """Gemini counts thoughts apart from candidates, and tool-use prompt tokens apart from
    the prompt; our convention folds each into output and input."""
    if metadata is None:
        return Usage()
    thoughts = metadata.thoughts_token_count or 0
    return Usage(
        input_tokens=(metadata.prompt_token_count or 0) + (metadata.tool_use_prompt_token_count or 0),
        output_tokens=(metadata.candidates_token_count or 0) + thoughts,
        cached_tokens=metadata.cached_content_token_count or 0,
        reasoning_tokens=thoughts,
    )


class ResponseFolder:
    """Folds responses (one, or a stream of chunks) into deltas and the final ``Generation``."""

    def __init__(self, provider: str, model: str) -> None:
        self._where = {"provider": provider, "model": model}
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._calls: list[ToolCall] = []
        self._signatures: list[dict[str, Any]] = []
        self._finish: str | None = None
        self._finish_message: str | None = None
        self._blocked: str | None = None
        self._usage: Any = None
        self._response_id: str | None = None

    def add(self, response: types.GenerateContentResponse) -> StreamDelta | None:
        self._response_id = self._response_id or response.response_id
        if response.usage_metadata is not None:
            self._usage = response.usage_metadata  # each chunk carries the running total
        feedback = response.prompt_feedback
        if feedback is not None and feedback.block_reason is not None:
            reason = _name(feedback.block_reason)
            self._blocked = f"{reason}: {feedback.block_reason_message}" if feedback.block_reason_message else reason
        if not response.candidates:
            return None
        candidate = response.candidates[0]
        if candidate.finish_reason is not None:
            self._finish = _name(candidate.finish_reason)
            self._finish_message = candidate.finish_message
        delta = StreamDelta()
        for part in (candidate.content.parts if candidate.content else None) or []:
            call_id = None
            if part.function_call is not None:
                call = part.function_call
                call_id = call.id or f"call_{uuid.uuid4().hex[:24]}"  # the Gemini API often gives none
                self._calls.append(ToolCall(id=call_id, name=call.name or "",
                                            arguments=json.dumps(call.args or {}, ensure_ascii=False)))
            elif part.text and part.thought:
                self._reasoning.append(part.text)
                delta.reasoning += part.text
            elif part.text:
                self._text.append(part.text)
                delta.text += part.text
            if part.thought_signature:
                signature = base64.b64encode(part.thought_signature).decode("ascii")
                self._signatures.append({"type": SIGNATURE_DETAIL, "signature": signature, "tool_call_id": call_id})
        return delta if delta.text or delta.reasoning else None

    def result(self) -> Generation:
        """The answer; a safety block or an answer without candidates is ``ContentFilterError``."""
        if self._blocked is not None:
            raise ContentFilterError(f"Gemini blocked the prompt ({self._blocked})", **self._where)
        if self._finish in _FILTER_FINISH:
            detail = f": {self._finish_message}" if self._finish_message else ""
            raise ContentFilterError(f"Gemini stopped the answer for {self._finish}{detail}", **self._where)
        if self._finish is None:
            if not (self._text or self._reasoning or self._calls):
                raise ContentFilterError("Gemini returned no candidates and no block reason", **self._where)
            raise InvalidResponseError("the answer ended before a finish reason", **self._where)
        finish = "tool_calls" if self._finish == "STOP" and self._calls else _FINISH_NAMES.get(
            self._finish, self._finish.lower())
        return Generation(
            text="".join(self._text),
            reasoning="".join(self._reasoning) or None,
            reasoning_details=self._signatures or None,
            tool_calls=self._calls,
            finish_reason=finish,
            usage=usage_of(self._usage),
            response_id=self._response_id,
        )


def _name(value: Any) -> str:
    return str(getattr(value, "value", value))


def _unb64(value: str | None) -> bytes | None:
    return base64.b64decode(value) if value else None
