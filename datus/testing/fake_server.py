"""A wire-level fake of the LLM providers, for tests and the demo.

The official SDKs talk real HTTP to it, so retries, timeouts, SSE parsing and error mapping
are exercised exactly as against the real services. It runs uvicorn in a background thread
with its own event loop (async handlers, so hundreds of slow calls can be in flight), and
answers from a `Script`. Provider spelling lives in `datus.testing.protocols`.

Other processes (Celery workers, the demo) drive it over HTTP:

    POST /_fake/script    queue answers; body: a list of entries, or {"entries": [...],
                          "reset": true, "fallback": "agent"}. An entry is {"reply": {...}} or
                          {"fault": {...}} with optional "match" (substring of the last user
                          message), "times" (default 1, null = forever) and "every" (answer
                          only every n-th request: a fault mix; then "times" defaults to
                          forever).
                          "reply" takes the `Reply` fields (tool_calls: [{"name",
                          "arguments", "id"}]); "fault" the `Fault` fields, e.g.
                          {"kind": "rate_limit", "retry_after": 2}. "fallback" names what
                          answers unscripted requests: "echo" (the default) or "agent"
                          (a plausible model: `datus.testing.agent_fallback`); "reset"
                          restores the fallback the server started with.
    POST /_fake/limits    enforce provider limits (`datus.testing.limits.ProviderLimits`):
                          {"requests_per_minute": 600, "input_tokens_per_minute": 200000,
                          "window_s": 2}; {} removes them
    GET  /_fake/limits    {"limits": {...}, "admitted": n, "limited": n} (null when none)
    POST /_fake/reset     empty the script, forget requests, restore the initial latency
                          and fallback, remove the limits
    GET  /_fake/requests  {"requests": [{"method", "path", "headers", "body", "protocol", "at"}]}
    POST /_fake/latency   {"latency_s": 0.2} or {"latency_ms": 200}
    GET  /_fake/health    {"status": "ok", "in_flight", "max_in_flight", ...}
    POST /_fake/batches   the provider batch APIs' clock and limits (`batch_jobs.BatchSettings`),
                          e.g. {"run_s": 2, "expire_after": 3}; {"reset": true} first restores them

The providers' batch APIs (OpenAI's Files + Batch API, Anthropic's Message Batches, Gemini's
batch mode) are served by `datus.testing.protocols.openai_batches` / `anthropic_batches` /
`gemini_batches` on the engine `server.batches`
(`datus.testing.protocols.batch_jobs`); each batch item is answered as an online request would be.

So that tests can check concurrency by what happened rather than by how long it took, the
server counts the generation requests it is handling (`in_flight`: received and not answered
yet; `max_in_flight`: the peak since the last `clear_requests()` or `reset()`), and `hold()`
keeps every request that arrives afterwards waiting, recorded and in flight, until
`release()`: "200 calls were in flight at once" becomes `in_flight == 200` while held.

While limits are set, a request over them is answered 429 with Retry-After before the
script is asked, and every answer carries the provider's rate-limit headers.

Faults that carry no answer of their own (hang, malformed_json, cut_stream) send what the
fallback handler would have answered: after the hang, or up to the break.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Self, get_args

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Send

from datus.models.scripted import (
    Answer,
    Fault,
    FaultKind,
    Handler,
    Reply,
    Script,
    ScriptedRequest,
    ScriptedToolCall,
    echo_handler,
)
from datus.testing.agent_fallback import agent_handler
from datus.testing.limits import LimitEnforcer, ProviderLimits
from datus.testing.protocols import ProtocolError, WireProtocol, default_protocols, estimate_usage
from datus.testing.protocols.anthropic_batches import anthropic_batch_routes
from datus.testing.protocols.batch_jobs import BatchEngine
from datus.testing.protocols.gemini_batches import gemini_batch_routes
from datus.testing.protocols.openai_batches import openai_batch_routes

__all__ = ["FALLBACKS", "FakeProviderServer", "RecordedRequest", "answer_from_json", "answer_to_json"]

_THREAD_PREFIX = "fake-provider-server"
_SSE_HEADERS = {"cache-control": "no-cache"}
#: What answers an unscripted request, by the name the CLI and `POST /_fake/script` use.
FALLBACKS: dict[str, Handler] = {"echo": echo_handler, "agent": agent_handler}


_ARRIVED = "fake_arrived"  # the request's scope state: (time.time(), time.monotonic()) when it arrived


class _StampArrival:
    """Stamps each request with when it arrived — as the server's first code to see it, before its
    body is read — so the limits count arrivals at the provider's edge, not when the handler got
    round to the request (a busy server's own delay is not the client's burst)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})[_ARRIVED] = (time.time(), time.monotonic())
        await self.app(scope, receive, send)


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the decoded JSON, or the raw text when it was not JSON
    protocol: str
    at: float = 0.0  # when it arrived (time.time())


class FakeProviderServer:
    """Start with `start()` or `with FakeProviderServer() as server:`; `port=0` picks a free
    port, known (with `url`) once started. `api_key=None` accepts any non-empty key.
    `fallback` answers what the script does not: a name in `FALLBACKS` ("echo", "agent") or a
    handler; None keeps the script's own (echo for a new `Script`)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        script: Script | None = None,
        *,
        api_key: str | None = None,
        protocols: Iterable[WireProtocol] | None = None,
        fallback: str | Handler | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.latency_s = latency_s  # read on every request, so it can change at runtime
        self.script = script if script is not None else Script()
        if fallback is not None:
            self.set_fallback(fallback)
        self._initial_fallback = self.script.fallback
        self.protocols = list(protocols) if protocols is not None else default_protocols()
        self._initial_latency_s = latency_s
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._in_flight = 0
        self._max_in_flight = 0
        self._gate: asyncio.Event | None = None  # while held: requests wait until release() sets it
        self.enforcer: LimitEnforcer | None = None  # the provider limits in force (set_limits)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self.batches = BatchEngine(self)  # the provider batch APIs' batches and files
        self.app = self._build_app()
        self.api_key = api_key

    @property
    def api_key(self) -> str | None:
        return self.app.state.api_key  # kept on the app, where secondary routes read it

    @api_key.setter
    def api_key(self, value: str | None) -> None:
        self.app.state.api_key = value

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._thread is None:
            raise RuntimeError("the fake server is not started; call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    def start(self) -> Self:
        if self._thread is not None:
            return self
        _install_log_filter()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio only turns Nagle off for sockets whose proto says
        # TCP, and with Nagle on every answer waits ~40 ms for the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))  # bound here so the port is known before serving
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,  # never reconfigure the host process's logging
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._run, args=(self._server, sock), name=f"{_THREAD_PREFIX}-{self.port}", daemon=True
        )
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                self._thread = None
                raise RuntimeError(f"the fake server could not start on {self.host}:{self.port}")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        thread, server, loop, closing = self._thread, self._server, self._loop, self._closing
        if thread is None or server is None:
            return
        self.release()
        if loop is not None and closing is not None and not loop.is_closed():
            loop.call_soon_threadsafe(closing.set)  # wakes hangs and latency sleeps
        server.should_exit = True
        thread.join(timeout=10)
        self._thread = self._server = self._loop = self._closing = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, server: uvicorn.Server, sock: socket.socket) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._closing = asyncio.Event()
            await server.serve(sockets=[sock])

        asyncio.run(serve())

    # -- state ----------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the recorded requests; the peak starts again from those in flight now."""
        with self._lock:
            self._requests.clear()
            self._max_in_flight = self._in_flight

    @property
    def in_flight(self) -> int:
        """Generation requests received and not answered yet (held ones included)."""
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The most requests in flight at once since the last `clear_requests()` or `reset()`."""
        with self._lock:
            return self._max_in_flight

    def hold(self) -> None:
        """Keep every request that arrives from now on waiting (recorded, in flight) until
        `release()`, `reset()` or `stop()`."""
        with self._lock:
            if self._gate is None:
                self._gate = asyncio.Event()

    def release(self) -> None:
        """Let the held requests go on, and stop holding new ones."""
        with self._lock:
            gate, self._gate = self._gate, None
        loop = self._loop
        if gate is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(gate.set)

    def set_fallback(self, fallback: str | Handler) -> None:
        """Answer unscripted requests with ``fallback`` from now on: a name in `FALLBACKS` or a
        handler."""
        if isinstance(fallback, str):
            if fallback not in FALLBACKS:
                raise ValueError(f"unknown fallback {fallback!r}; expected one of {', '.join(FALLBACKS)}")
            fallback = FALLBACKS[fallback]
        self.script.fallback = fallback

    @property
    def fallback_name(self) -> str:
        """The name of the fallback in force, "custom" for a handler of the caller's."""
        return next((name for name, handler in FALLBACKS.items() if handler is self.script.fallback), "custom")

    def set_limits(self, limits: ProviderLimits | None) -> None:
        """Enforce ``limits`` from now on (fresh buckets, counts from zero); None removes them."""
        self.enforcer = LimitEnforcer(limits) if limits is not None else None

    def reset(self) -> None:
        """Back to how it started: empty script, the first fallback, no requests, first latency,
        nothing held, no limits."""
        self.release()
        self.script.reset(fallback=self._initial_fallback)
        self.clear_requests()
        self.latency_s = self._initial_latency_s
        self.set_limits(None)
        self.batches.reset()

    # -- the app ----------------------------------------------------------------------------

    def _build_app(self) -> Starlette:
        routes: list[BaseRoute] = [
            Route("/_fake/script", self._admin_script, methods=["POST"]),
            Route("/_fake/limits", self._admin_limits, methods=["GET", "POST"]),
            Route("/_fake/reset", self._admin_reset, methods=["POST"]),
            Route("/_fake/requests", self._admin_requests, methods=["GET"]),
            Route("/_fake/latency", self._admin_latency, methods=["POST"]),
            Route("/_fake/health", self._admin_health, methods=["GET"]),
            Route("/_fake/batches", self._admin_batches, methods=["POST"]),
        ]
        for protocol in self.protocols:
            endpoint = self._endpoint(protocol)
            routes += [Route(path, endpoint, methods=["POST"]) for path in protocol.paths]
            routes += protocol.extra_routes()
        # before the protocols' own routes would not matter: no path is shared
        routes += openai_batch_routes(self.batches, self.protocols)
        routes += anthropic_batch_routes(self.batches, self.protocols)
        routes += gemini_batch_routes(self.batches, self.protocols)
        return Starlette(routes=routes, middleware=[Middleware(_StampArrival)])

    def _endpoint(self, protocol: WireProtocol) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await self._generate(protocol, request)

        return endpoint

    async def _generate(self, protocol: WireProtocol, request: Request) -> Response:
        arrived_at, arrived = request.scope["state"][_ARRIVED]
        raw = await request.body()
        try:
            body, valid = json.loads(raw), True
        except ValueError:
            body, valid = raw.decode("utf-8", "replace"), False
        record = RecordedRequest(request.method, request.url.path, dict(request.headers), body, protocol.name,
                                 arrived_at)
        with self._lock:
            self._requests.append(record)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            gate = self._gate
        try:
            if gate is not None:
                await gate.wait()
            return await self._answer(protocol, request, body, valid, arrived)
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _answer(self, protocol: WireProtocol, request: Request, body: Any, valid: bool,
                      arrived: float) -> Response:
        denied = protocol.authenticate(request, self.api_key)
        if denied is not None:
            return denied
        if not valid:
            return protocol.invalid_json()
        try:
            scripted = protocol.parse(request, body)
        except ProtocolError as exc:
            return exc.response
        enforcer = self.enforcer
        admission = enforcer.admit(estimate_usage(scripted, Reply()).input_tokens, at=arrived) if enforcer else None
        if admission is not None and not admission.admitted:
            response = protocol.render_fault(Fault("rate_limit", retry_after=round(admission.retry_after_s, 3)),
                                             scripted)
        else:
            answer = self.script.next_answer(scripted)
            await self._sleep(self.latency_s + (answer.latency_s if isinstance(answer, Reply) else 0.0))
            if isinstance(answer, Fault):
                response = await self._fault(protocol, answer, scripted)
            else:
                response = self._reply(protocol, answer, scripted)
        if admission is not None:
            response.headers.update(protocol.budget_headers(admission))
        return response

    def _reply(self, protocol: WireProtocol, reply: Reply, scripted: ScriptedRequest) -> Response:
        if scripted.stream:
            return _FramedResponse(protocol.stream_frames(reply, scripted))
        return protocol.render_json(reply, scripted)

    async def _fault(self, protocol: WireProtocol, fault: Fault, scripted: ScriptedRequest) -> Response:
        if fault.kind not in ("hang", "malformed_json", "cut_stream"):
            return protocol.render_fault(fault, scripted)
        fallback = self.script.fallback(scripted)
        reply = fallback if isinstance(fallback, Reply) else echo_handler(scripted)
        if fault.kind == "hang":
            await self._sleep(fault.seconds)
            return self._reply(protocol, reply, scripted)
        if fault.kind == "malformed_json":
            if scripted.stream:
                frames = protocol.stream_frames(reply, scripted)[:1] + [protocol.malformed_frame(scripted)]
                return _FramedResponse(frames)
            return Response(protocol.malformed_body(scripted), media_type="application/json")
        if scripted.stream:  # cut_stream
            frames = protocol.stream_frames(reply, scripted)
            return _FramedResponse(frames[: min(fault.after_chunks, len(frames) - 1)], complete=False)
        whole = bytes(protocol.render_json(reply, scripted).body)  # promise it all, send half
        headers = {"content-length": str(len(whole))}
        return _FramedResponse([whole[: len(whole) // 2]], "application/json", headers, complete=False)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the server stops, so stop() never waits on a hang."""
        if seconds <= 0 or self._closing is None:
            return
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            pass

    # -- admin endpoints ----------------------------------------------------------------

    async def _admin_script(self, request: Request) -> Response:
        try:
            payload = await request.json()
            entries = payload if isinstance(payload, list) else payload.get("entries", [])
            if isinstance(payload, dict) and payload.get("reset"):
                self.script.reset(fallback=self._initial_fallback)
            if isinstance(payload, dict) and payload.get("fallback") is not None:
                self.set_fallback(str(payload["fallback"]))
            for entry in entries:
                every = entry.get("every")
                self.script.add(answer_from_json(entry), match=entry.get("match"), every=every,
                                times=entry.get("times", None if every else 1))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return JSONResponse({"error": f"bad script: {exc}"}, status_code=400)
        return JSONResponse({"pending": self.script.pending(), "fallback": self.fallback_name})

    async def _admin_limits(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                payload = await request.json()
                self.set_limits(ProviderLimits.from_json(payload) if payload else None)
            except (ValueError, TypeError, AttributeError) as exc:
                return JSONResponse({"error": f"bad limits: {exc}"}, status_code=400)
        enforcer = self.enforcer
        return JSONResponse(enforcer.counts() if enforcer else {"limits": None, "admitted": 0, "limited": 0})

    async def _admin_reset(self, request: Request) -> Response:
        self.reset()
        return JSONResponse({"ok": True})

    async def _admin_requests(self, request: Request) -> Response:
        return JSONResponse({"requests": [dataclasses.asdict(item) for item in self.requests]})

    async def _admin_latency(self, request: Request) -> Response:
        try:
            payload = await request.json()
            seconds = float(payload["latency_s"]) if "latency_s" in payload else float(payload["latency_ms"]) / 1000
        except (ValueError, TypeError, KeyError) as exc:
            return JSONResponse({"error": f"expected latency_s or latency_ms: {exc}"}, status_code=400)
        self.latency_s = seconds
        return JSONResponse({"latency_s": seconds})

    async def _admin_batches(self, request: Request) -> Response:
        try:
            payload = dict(await request.json())
            if payload.pop("reset", False):
                self.batches.reset()
            settings = self.batches.configure(**payload)
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": f"bad batch settings: {exc}"}, status_code=400)
        return JSONResponse(dataclasses.asdict(settings))

    async def _admin_health(self, request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "protocols": [protocol.name for protocol in self.protocols],
                "latency_s": self.latency_s,
                "fallback": self.fallback_name,
                "pending": self.script.pending(),
                "requests": len(self._requests),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
            }
        )


class _FramedResponse(StreamingResponse):
    """Sends pre-rendered frames; `complete=False` ends the handler without finishing the
    body, which makes uvicorn drop the connection: the client sees a broken transfer."""

    def __init__(
        self,
        frames: list[bytes],
        media_type: str = "text/event-stream",
        headers: dict[str, str] | None = None,
        complete: bool = True,
    ) -> None:
        self._frames = frames
        self._complete = complete
        extra = _SSE_HEADERS if media_type == "text/event-stream" else {}
        super().__init__(frames, headers={**extra, **(headers or {})}, media_type=media_type)

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for frame in self._frames:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        if self._complete:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class _DeliberateCutFilter(logging.Filter):
    """uvicorn logs an error when a handler leaves a response unfinished; from our server
    threads that is a scripted cut, not a bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        deliberate = threading.current_thread().name.startswith(_THREAD_PREFIX)
        return not (deliberate and record.getMessage().startswith("ASGI callable returned without completing"))


_LOG_FILTER = _DeliberateCutFilter()


def _install_log_filter() -> None:
    logging.getLogger("uvicorn.error").addFilter(_LOG_FILTER)  # idempotent for one instance


# -- the JSON form of script entries -----------------------------------------------------


def answer_from_json(entry: dict[str, Any]) -> Answer:
    """`{"reply": {...}}` or `{"fault": {...}}` (see the module docstring) to a script answer."""
    if "fault" in entry:
        fault = Fault(**entry["fault"])
        if fault.kind not in get_args(FaultKind):
            raise ValueError(f"unknown fault kind {fault.kind!r}; expected one of {get_args(FaultKind)}")
        return fault
    if "reply" in entry:
        fields = dict(entry["reply"])
        calls = [ScriptedToolCall(**call) for call in fields.pop("tool_calls", [])]
        return Reply(**fields, tool_calls=tuple(calls))
    raise ValueError("each entry needs a 'reply' or a 'fault' object")


def answer_to_json(answer: Answer, match: str | None = None, times: int | None = 1,
                   every: int | None = None) -> dict[str, Any]:
    """The inverse of `answer_from_json`, as one entry for `POST /_fake/script`."""
    key = "fault" if isinstance(answer, Fault) else "reply"
    entry: dict[str, Any] = {key: dataclasses.asdict(answer), "times": times}
    if match is not None:
        entry["match"] = match
    if every is not None:
        entry["every"] = every
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the fake LLM provider server until SIGINT/SIGTERM.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--api-key", default=None, help="the only key accepted (default: any non-empty key)")
    parser.add_argument("--fallback", choices=sorted(FALLBACKS), default="echo",
                        help="what answers unscripted requests: echo the prompt, or answer like a plausible model")
    parser.add_argument("--requests-per-minute", type=float, default=None, help="enforce a provider request limit")
    parser.add_argument("--input-tokens-per-minute", type=float, default=None, help="enforce an input-token limit")
    parser.add_argument("--window-s", type=float, default=60.0,
                        help="how much of a limit may be used at once, in seconds of it (default 60)")
    parser.add_argument("--nice", type=int, default=0,
                        help="add this to the process's nice value first (negative: ahead of other processes, "
                             "where the OS allows it; else it runs as it is)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.nice:
        with contextlib.suppress(OSError):  # before any thread starts: they inherit it
            os.nice(args.nice)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    server = FakeProviderServer(args.host, args.port, args.latency_ms / 1000, api_key=args.api_key,
                                fallback=args.fallback).start()
    if args.requests_per_minute or args.input_tokens_per_minute:
        server.set_limits(ProviderLimits(args.requests_per_minute, args.input_tokens_per_minute, args.window_s))
    print(f"fake provider server listening on {server.url} (fallback: {args.fallback})", flush=True)
    while not stopping.wait(0.2):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
