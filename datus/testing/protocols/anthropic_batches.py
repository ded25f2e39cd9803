"""Anthropic's Message Batches on the fake server.

    POST /v1/messages/batches                  {"requests": [{"custom_id", "params"}]} -> MessageBatch
    GET  /v1/messages/batches                  a page (after_id, before_id, limit), newest first
    GET  /v1/messages/batches/{id}             MessageBatch
    GET  /v1/messages/batches/{id}/results     JSONL, one MessageBatchIndividualResponse a line
    POST /v1/messages/batches/{id}/cancel      MessageBatch (canceling)

Shapes are the `anthropic` SDK's (`MessageBatch`, `MessageBatchRequestCounts`, the result types
succeeded / errored / canceled / expired). ``processing_status`` is in_progress, canceling or
ended; ``results_url`` is set once the batch has ended, and the results come in answering
order, not the requests' (match them by custom_id). A custom_id must match
``^[a-zA-Z0-9_-]{1,64}$`` and be unique in its batch; a batch holds at most 100,000 requests
or 256 MB — otherwise the create is refused with a 400, as upstream. The clock and the limits:
`batch_jobs.BatchSettings`.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from datus.testing.protocols import WireProtocol
from datus.testing.protocols.batch_jobs import BatchEngine, BatchItem, BatchJob

__all__ = ["anthropic_batch_routes"]

_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_WINDOW_S = 24 * 3600


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _error(status: int, type_: str, message: str) -> JSONResponse:
    return JSONResponse({"type": "error", "error": {"type": type_, "message": message}}, status_code=status)


class _AnthropicBatches:
    def __init__(self, engine: BatchEngine, messages: WireProtocol) -> None:
        self.engine, self.messages = engine, messages

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/messages/batches", self.create, methods=["POST"]),
            Route("/v1/messages/batches", self.list, methods=["GET"]),
            Route("/v1/messages/batches/{batch_id}", self.retrieve, methods=["GET"]),
            Route("/v1/messages/batches/{batch_id}/results", self.results, methods=["GET"]),
            Route("/v1/messages/batches/{batch_id}/cancel", self.cancel, methods=["POST"]),
        ]

    def _denied(self, request: Request) -> Response | None:
        return self.messages.authenticate(request, request.app.state.api_key)

    def _job(self, request: Request) -> BatchJob | None:
        job = self.engine.get(request.path_params["batch_id"])
        return job if job is not None and job.batch_id.startswith("msgbatch_") else None

    async def create(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        raw = await request.body()
        settings = self.engine.settings
        if len(raw) > settings.anthropic_max_bytes:
            return _error(413, "request_too_large", f"Batch exceeds the maximum size of "
                          f"{settings.anthropic_max_bytes} bytes.")
        try:
            body = json.loads(raw)
        except ValueError:
            return self.messages.invalid_json()
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            return _error(400, "invalid_request_error", "requests: at least one request is required")
        if len(requests) > settings.anthropic_max_requests:
            return _error(400, "invalid_request_error", f"requests: a batch holds at most "
                          f"{settings.anthropic_max_requests} requests, got {len(requests)}")
        seen: set[str] = set()
        items: list[BatchItem] = []
        for index, entry in enumerate(requests):
            custom_id = entry.get("custom_id") if isinstance(entry, dict) else None
            params = entry.get("params") if isinstance(entry, dict) else None
            if not isinstance(custom_id, str) or not _CUSTOM_ID.match(custom_id):
                return _error(400, "invalid_request_error",
                              f"requests.{index}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
            if custom_id in seen:
                return _error(400, "invalid_request_error",
                              f"requests.{index}.custom_id: Duplicate custom_id {custom_id!r}")
            if not isinstance(params, dict):
                return _error(400, "invalid_request_error", f"requests.{index}.params: Field required")
            if params.get("stream"):
                return _error(400, "invalid_request_error", f"requests.{index}.params.stream: "
                              "streaming is not supported in batches")
            seen.add(custom_id)
            items.append(BatchItem(custom_id, params))
        if not await self.engine.gate("create", request):
            return Response(status_code=499)
        job = self.engine.create("msgbatch_", self.messages, request, items)
        if not await self.engine.gate("created", request):
            return Response(status_code=499)
        return JSONResponse(self._batch(job, request))

    async def retrieve(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        job = self._job(request)
        if job is None:
            return _error(404, "not_found_error", "The requested resource could not be found.")
        return JSONResponse(self._batch(job, request))

    async def list(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        jobs = self.engine.listed("msgbatch_")
        ids = [job.batch_id for job in jobs]
        after, before = request.query_params.get("after_id"), request.query_params.get("before_id")
        if after in ids:
            jobs = jobs[ids.index(after) + 1:]
        elif before in ids:
            jobs = jobs[: ids.index(before)]
        limit = int(request.query_params.get("limit", 20))
        data = [self._batch(job, request) for job in jobs[:limit]]
        return JSONResponse({"data": data, "has_more": len(jobs) > limit,
                             "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    async def results(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        job = self._job(request)
        if job is None:
            return _error(404, "not_found_error", "The requested resource could not be found.")
        if job.phase(time.time()) != "ended":
            return _error(400, "invalid_request_error", f"Message Batch {job.batch_id} has not finished "
                          "processing; results are available once processing_status is ended.")
        if not await self.engine.gate("results", request):
            return Response(status_code=499)
        lines = []
        for index in job.order:  # answering order, not the requests'
            item = job.items[index]
            result: dict[str, Any] = {"type": item.outcome}
            if item.outcome == "succeeded":
                result["message"] = item.answer
            elif item.outcome == "errored":
                result["error"] = item.answer
            lines.append(json.dumps({"custom_id": item.custom_id, "result": result}))
        return Response("\n".join(lines) + "\n", media_type="application/binary")

    async def cancel(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        job = self._job(request)
        if job is None:
            return _error(404, "not_found_error", "The requested resource could not be found.")
        self.engine.cancel(job)
        return JSONResponse(self._batch(job, request))

    def _batch(self, job: BatchJob, request: Request) -> dict[str, Any]:
        phase = job.phase(self.engine.advance(job))
        status = "ended" if phase == "ended" else "canceling" if job.cancelled_at is not None else "in_progress"
        ended = status == "ended"
        base = str(request.base_url).rstrip("/")
        return {
            "id": job.batch_id, "type": "message_batch", "processing_status": status,
            "request_counts": {"processing": job.count("pending"), "succeeded": job.count("succeeded"),
                               "errored": job.count("errored"), "canceled": job.count("canceled"),
                               "expired": job.count("expired")},
            "created_at": _iso(job.created_at), "expires_at": _iso(job.created_at + _WINDOW_S),
            "ended_at": _iso(job.ended_at()) if ended else None, "archived_at": None,
            "cancel_initiated_at": _iso(job.cancelled_at) if job.cancelled_at is not None else None,
            "results_url": f"{base}/v1/messages/batches/{job.batch_id}/results" if ended else None,
        }


def anthropic_batch_routes(engine: BatchEngine, protocols: list[WireProtocol]) -> list[BaseRoute]:
    """The routes, when the server speaks Anthropic's Messages protocol (which answers the items)."""
    messages = next((protocol for protocol in protocols if protocol.name == "anthropic"), None)
    return _AnthropicBatches(engine, messages).routes() if messages is not None else []
