"""Gemini's batch mode on the fake server (inline requests only), as `google-genai`'s
``client.batches`` speaks it to the Gemini Developer API.

    POST /v1beta/models/{model}:batchGenerateContent   {"batch": {"displayName", "inputConfig":
                                                        {"requests": {"requests": [{"request",
                                                        "metadata": {"key"}}]}}}} -> the batch
    GET  /v1beta/batches                                {"operations": [...]} (newest first)
    GET  /v1beta/batches/{id}                           the batch
    POST /v1beta/batches/{id}:cancel                    {}

A batch is a long-running operation: ``{"name": "batches/<id>", "metadata": {"state":
"BATCH_STATE_PENDING" | RUNNING | SUCCEEDED | CANCELLED | EXPIRED, "batchStats", "displayName",
"model", "createTime", ..., "output": {"inlinedResponses": {"inlinedResponses": [...]}}},
"done"}``. Each inlined response carries the request's ``metadata`` (its key) and either a
``response`` (a GenerateContentResponse) or an ``error`` (``{"code", "message", "status"}``);
they come in the requests' order. An input file (``fileName``) is refused here: not written. The
clock: `batch_jobs.BatchSettings`.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from datus.testing.protocols import WireProtocol
from datus.testing.protocols.batch_jobs import BatchEngine, BatchItem, BatchJob

__all__ = ["gemini_batch_routes"]

_VERSIONS = ("v1beta", "v1")
_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_STATE = {"validating": "BATCH_STATE_PENDING", "in_progress": "BATCH_STATE_RUNNING",
          "finalizing": "BATCH_STATE_RUNNING", "cancelling": "BATCH_STATE_RUNNING"}


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": message, "status": _STATUS_NAMES.get(status, "UNKNOWN")}},
                        status_code=status)


class _GeminiBatches:
    def __init__(self, engine: BatchEngine, gemini: WireProtocol) -> None:
        self.engine, self.gemini = engine, gemini

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = []
        for version in _VERSIONS:
            routes += [
                Route(f"/{version}/models/{{model}}:batchGenerateContent", self.create, methods=["POST"]),
                Route(f"/{version}/batches/{{batch_id}}:cancel", self.cancel, methods=["POST"]),
                Route(f"/{version}/batches", self.list, methods=["GET"]),
                Route(f"/{version}/batches/{{batch_id}}", self.retrieve, methods=["GET"]),
            ]
        return routes

    def _denied(self, request: Request) -> Response | None:
        return self.gemini.authenticate(request, request.app.state.api_key)

    def _job(self, request: Request) -> BatchJob | None:
        job = self.engine.get("gembatch-" + request.path_params["batch_id"].removeprefix("gembatch-"))
        return job

    async def create(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except ValueError:
            return self.gemini.invalid_json()
        batch = body.get("batch") if isinstance(body, dict) else None
        config = (batch or {}).get("inputConfig") or {}
        if "fileName" in config:
            return _error(400, "the fake Gemini server takes inline requests only")
        entries = ((config.get("requests") or {}).get("requests")) or []
        if not entries:
            return _error(400, "* BatchGenerateContentRequest.batch.input_config: requests are required")
        limit = self.engine.settings.gemini_max_bytes
        if len(await request.body()) > limit:
            return _error(400, f"Request payload size exceeds the limit: {limit} bytes.")
        items = []
        for index, entry in enumerate(entries):
            key = str(((entry.get("metadata") or {}).get("key")) or index)
            items.append(BatchItem(key, entry.get("request") or {}))
        if not await self.engine.gate("create", request):
            return Response(status_code=499)
        model = request.path_params["model"]
        job = self.engine.create("gembatch-", self.gemini, request, items, model=model,
                                 display_name=batch.get("displayName"), path_params={"model": model})
        if not await self.engine.gate("created", request):
            return Response(status_code=499)
        return JSONResponse(self._batch(job))

    async def retrieve(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        if not await self.engine.gate("results", request):
            return Response(status_code=499)
        job = self._job(request)
        if job is None:
            return _error(404, f"Batch {request.path_params['batch_id']} not found.")
        return JSONResponse(self._batch(job))

    async def list(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        return JSONResponse({"operations": [self._batch(job) for job in self.engine.listed("gembatch-")]})

    async def cancel(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        job = self._job(request)
        if job is None:
            return _error(404, f"Batch {request.path_params['batch_id']} not found.")
        self.engine.cancel(job)
        return JSONResponse({})

    def _batch(self, job: BatchJob) -> dict[str, Any]:
        phase = job.phase(self.engine.advance(job))
        if phase == "ended":
            state = ("BATCH_STATE_CANCELLED" if job.cancelled_at is not None else
                     "BATCH_STATE_EXPIRED" if job.expired else "BATCH_STATE_SUCCEEDED")
        else:
            state = _STATE[phase]
        name = "batches/" + job.batch_id
        metadata: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "name": name, "model": f"models/{job.extra['model']}", "displayName": job.extra.get("display_name"),
            "createTime": _iso(job.created_at), "updateTime": _iso(time.time()), "state": state,
            "batchStats": {"requestCount": str(len(job.items)), "pendingRequestCount": str(job.count("pending")),
                           "successfulRequestCount": str(job.count("succeeded")),
                           "failedRequestCount": str(job.count("errored", "expired", "canceled"))},
        }
        operation: dict[str, Any] = {"name": name, "metadata": metadata, "done": phase == "ended"}
        if phase == "ended":
            metadata["endTime"] = _iso(job.ended_at())
            output = {"inlinedResponses": {"inlinedResponses": [self._response(item) for item in job.items]}}
            metadata["output"] = output
            operation["response"] = {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput", **output}
        return operation

    def _response(self, item: BatchItem) -> dict[str, Any]:
        entry: dict[str, Any] = {"metadata": {"key": item.custom_id}}
        if item.outcome == "succeeded":
            entry["response"] = item.answer
        elif item.outcome == "errored":
            entry["error"] = (item.answer or {}).get("error") or {"code": item.status, "message": "error"}
        else:
            code, status = (504, "DEADLINE_EXCEEDED") if item.outcome == "expired" else (499, "CANCELLED")
            entry["error"] = {"code": code, "message": f"the batch {item.outcome} this request", "status": status}
        return entry


def gemini_batch_routes(engine: BatchEngine, protocols: list[WireProtocol]) -> list[BaseRoute]:
    """The routes, when the server speaks Gemini's generateContent (which answers the items)."""
    gemini = next((protocol for protocol in protocols if protocol.name == "gemini"), None)
    return _GeminiBatches(engine, gemini).routes() if gemini is not None else []
