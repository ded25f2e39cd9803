"""Observers: who hears about each model call and each tool call, without the model layer
knowing who they are (a tracer, a test).

An observer is installed for a block of code, and hears about every call made inside it
(tasks started inside it too: the observers ride in a context variable)::

    with observing(my_observer):
        await model.agenerate("hi")

For each logical model call — all its attempts, streamed or not, each turn of a tool run —
the model layer asks every observer for a span (``observer.model_call(ModelCall)``) and
ends it with the finished `Generation` (its ``usage`` the same record ``record_usage``
gets) or the error. Each tool the tool loop calls gets ``observer.tool_call(ToolCallInfo)``,
ended with the `ToolOutcome` (a failed outcome is ``is_error``) or the exception. A span is
any object with ``end(result, error)``; an observer that wants no span returns None.

Nobody observing costs one context-variable read per call. An observer that raises is
logged and ignored: observing never changes what a call returns or raises.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from datus.models.generation import ModelRequest

__all__ = ["ModelCall", "Observer", "Span", "ToolCallInfo", "model_call", "observing", "tool_call"]

logger = logging.getLogger("datus.models.observe")


@dataclass(frozen=True)
class ModelCall:
    """One logical model call about to start (its retries included). The tool loop goes on
    appending to ``request.messages`` after the call: copy what you keep of it at start."""

    provider: str
    model: str
    request: ModelRequest
    stream: bool = False


@dataclass(frozen=True)
class ToolCallInfo:
    """One tool call about to start."""

    name: str
    arguments: dict[str, Any]
    call_id: str | None = None
    server: str | None = None  # the MCP server it belongs to, if any


class Span(Protocol):
    def end(self, result: Any, error: BaseException | None) -> None:
        """The call ended: ``result`` (a `Generation` or `ToolOutcome`) or ``error``."""


class Observer(Protocol):
    def model_call(self, call: ModelCall) -> Span | None: ...

    def tool_call(self, call: ToolCallInfo) -> Span | None: ...


_observers: contextvars.ContextVar[tuple[Observer, ...]] = contextvars.ContextVar("datus_observers", default=())


@contextlib.contextmanager
def observing(*observers: Observer) -> Iterator[None]:
    """Every call made inside the block is reported to ``observers`` (and to those already
    installed around it)."""
    token = _observers.set((*_observers.get(), *observers))
    try:
        yield
    finally:
        _observers.reset(token)


class _Spans:
    """The spans of one call, one per observer that wanted one."""

    __slots__ = ("ended", "spans")

    def __init__(self, spans: list[Span]) -> None:
        self.spans = spans
        self.ended = False

    def end(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        for span in self.spans:
            try:
                span.end(result, error)
            except Exception as exc:  # noqa: BLE001 - an observer never breaks a call
                logger.warning("an observer failed ending a span (%s): %s: %s", type(span).__name__,
                               type(exc).__name__, exc)


def _start(kind: str, info: Any) -> _Spans | None:
    observers = _observers.get()
    if not observers:
        return None
    spans: list[Span] = []
    for observer in observers:
        try:
            span = getattr(observer, kind)(info)
        except Exception as exc:  # noqa: BLE001 - an observer never breaks a call
            logger.warning("an observer failed starting a span (%s): %s: %s", type(observer).__name__,
                           type(exc).__name__, exc)
            continue
        if span is not None:
            spans.append(span)
    return _Spans(spans) if spans else None


class _Observed:
    """``with model_call(...) as spans:`` — ``spans`` is None when nobody observes; else the
    code inside calls ``spans.end(result)`` once it has the result. Leaving the block with an
    exception (cancellation and a closed stream included) ends the spans with it."""

    __slots__ = ("info", "kind", "spans")

    def __init__(self, kind: str, info: Any) -> None:
        self.kind, self.info, self.spans = kind, info, None

    def __enter__(self) -> _Spans | None:
        self.spans = _start(self.kind, self.info)
        return self.spans

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if self.spans is not None:
            self.spans.end(None, exc)


def model_call(provider: str, model: str, request: ModelRequest, stream: bool = False) -> _Observed:
    return _Observed("model_call", ModelCall(provider, model, request, stream)) if _observers.get() else _OFF


def tool_call(name: str, arguments: dict[str, Any], call_id: str | None = None,
              server: str | None = None) -> _Observed:
    return _Observed("tool_call", ToolCallInfo(name, arguments, call_id, server)) if _observers.get() else _OFF


class _Off:
    """What ``model_call``/``tool_call`` return when nobody observes: a no-op block."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_OFF: Any = _Off()
