"""OpenAI's Files and Batch APIs on the fake server (also DashScope's OpenAI-compatible ones).

    POST /v1/files                    multipart: purpose=batch, file=<JSONL> -> FileObject
    GET  /v1/files/{id}               FileObject
    GET  /v1/files/{id}/content       the file's bytes (input, output or error JSONL)
    POST /v1/batches                  {input_file_id, endpoint, completion_window, metadata} -> Batch
    GET  /v1/batches                  a cursor page (after, limit), newest first
    GET  /v1/batches/{id}             Batch
    POST /v1/batches/{id}/cancel      Batch (cancelling)

Shapes are the `openai` SDK's (`FileObject`, `Batch`, `BatchRequestCounts`): each input line is
``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}`` (or ``/v1/responses``,
answered by the Responses protocol when the server speaks it); an output line is
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}``. Items
answered 200 go to ``output_file_id``, the others to ``error_file_id`` (an HTTP error keeps its
``response``; an expired or cancelled item has ``response: null`` and an ``error`` with code
``batch_expired`` / ``batch_cancelled``). A file over the limits, duplicate custom_ids, lines
that are not JSON or name another endpoint fail the batch at validation (``status: failed``,
``errors.data``), as upstream. The clock and the limits: `batch_jobs.BatchSettings`.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from datus.testing.protocols import WireProtocol
from datus.testing.protocols.batch_jobs import BatchEngine, BatchItem, BatchJob

__all__ = ["openai_batch_routes"]

# https://platform.openai.com/docs/api-reference/batch/create: the endpoint of every request in
# the batch; /v1/chat/completions and /v1/responses are the two whose answers this server renders
_PROTOCOL_OF_ENDPOINT = {"/v1/chat/completions": "openai", "/v1/responses": "openai_responses"}
_WINDOW_S = 24 * 3600


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": code}}, status_code=status)


class _OpenAIBatches:
    def __init__(self, engine: BatchEngine, chat: WireProtocol, by_endpoint: dict[str, WireProtocol]) -> None:
        self.engine, self.chat, self.by_endpoint = engine, chat, by_endpoint

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/files", self.upload, methods=["POST"]),
            Route("/v1/files/{file_id}", self.file_info, methods=["GET"]),
            Route("/v1/files/{file_id}/content", self.file_content, methods=["GET"]),
            Route("/v1/batches", self.create, methods=["POST"]),
            Route("/v1/batches", self.list, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self.retrieve, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self.cancel, methods=["POST"]),
        ]

    def _denied(self, request: Request) -> Response | None:
        return self.chat.authenticate(request, request.app.state.api_key)

    # -- files ----------------------------------------------------------------------------

    async def upload(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        form = await request.form()
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose is None:
            return _error(400, "Missing required parameter: 'purpose'.", param="purpose")
        if upload is None or isinstance(upload, str):
            return _error(400, "Missing required parameter: 'file'.", param="file")
        content = await upload.read()
        limit = self.engine.settings.openai_max_file_bytes
        if purpose == "batch" and len(content) > limit:
            return _error(400, f"File is too large: {len(content)} bytes; the limit for batch files is {limit}.",
                          param="file")
        stored = self.engine.add_file(upload.filename or "upload.jsonl", str(purpose), content)
        return JSONResponse(_file_object(stored.file_id, stored.filename, stored.purpose, len(content),
                                         stored.created_at))

    async def file_info(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        stored = self.engine.file(request.path_params["file_id"])
        if stored is None:
            return _error(404, f"No such File object: {request.path_params['file_id']}", param="id")
        return JSONResponse(_file_object(stored.file_id, stored.filename, stored.purpose, len(stored.content),
                                         stored.created_at))

    async def file_content(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        if not await self.engine.gate("results", request):
            return Response(status_code=499)
        stored = self.engine.file(request.path_params["file_id"])
        if stored is None:
            return _error(404, f"No such File object: {request.path_params['file_id']}", param="id")
        return Response(stored.content, media_type="application/octet-stream")

    # -- batches ----------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except ValueError:
            return self.chat.invalid_json()
        for field in ("input_file_id", "endpoint", "completion_window"):
            if not body.get(field):
                return _error(400, f"Missing required parameter: '{field}'.", param=field)
        if body["endpoint"] not in self.by_endpoint:
            return _error(400, f"Invalid value for 'endpoint': {body['endpoint']!r}; this server supports "
                          f"{', '.join(self.by_endpoint)}.", param="endpoint")
        if body["completion_window"] != "24h":
            return _error(400, "Invalid value for 'completion_window': only '24h' is supported.",
                          param="completion_window")
        stored = self.engine.file(body["input_file_id"])
        if stored is None:
            return _error(400, f"No such File object: {body['input_file_id']}", param="input_file_id")
        if stored.purpose != "batch":
            return _error(400, "The input file must be uploaded with purpose 'batch'.", param="input_file_id")
        if not await self.engine.gate("create", request):
            return Response(status_code=499)
        items, errors = self._items(stored.content, body["endpoint"])
        job = self.engine.create("batch_", self.by_endpoint[body["endpoint"]], request, items,
                                 endpoint=body["endpoint"],
                                 input_file_id=stored.file_id, metadata=body.get("metadata"))
        if errors:
            job.failed = errors
            job.extra["failed_at"] = int(time.time())
        if not await self.engine.gate("created", request):
            return Response(status_code=499)
        return JSONResponse(self._batch(job))

    def _items(self, content: bytes, endpoint: str) -> tuple[list[BatchItem], list[dict[str, Any]]]:
        items: list[BatchItem] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        model: str | None = None
        lines = content.decode("utf-8", "replace").splitlines()
        limit = self.engine.settings.openai_max_requests
        if len(lines) > limit:
            return [], [{"code": "too_many_requests", "line": None, "param": None,
                         "message": f"The batch input file has {len(lines)} requests; the limit is {limit}."}]
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                custom_id, url, item_body = entry["custom_id"], entry["url"], entry["body"]
            except (ValueError, KeyError, TypeError):
                errors.append({"code": "invalid_json_line", "line": number, "param": None,
                               "message": "This line is not parseable as valid JSON, or lacks custom_id, url or body."})
                continue
            if url != endpoint:
                errors.append({"code": "mismatched_endpoint", "line": number, "param": "url",
                               "message": f"The url {url!r} does not match the batch's endpoint {endpoint!r}."})
            if custom_id in seen:
                errors.append({"code": "duplicate_custom_id", "line": number, "param": "custom_id",
                               "message": "The custom_id for this request is a duplicate of another request."})
            if model is not None and item_body.get("model") != model:
                errors.append({"code": "mismatched_model", "line": number, "param": "body.model",
                               "message": "All requests in a batch must use the same model."})
            model = model or item_body.get("model")
            seen.add(custom_id)
            items.append(BatchItem(str(custom_id), item_body))
        if not items and not errors:
            errors.append({"code": "empty_file", "line": None, "param": None,
                           "message": "The batch input file is empty."})
        return items, errors

    async def retrieve(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        job = self.engine.get(request.path_params["batch_id"])
        if job is None or not job.batch_id.startswith("batch_"):
            return _error(404, f"No batch found with id '{request.path_params['batch_id']}'.", param="batch_id")
        return JSONResponse(self._batch(job))

    async def list(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        jobs = self.engine.listed("batch_")
        after = request.query_params.get("after")
        if after:
            ids = [job.batch_id for job in jobs]
            jobs = jobs[ids.index(after) + 1:] if after in ids else []
        limit = int(request.query_params.get("limit", 20))
        page = jobs[:limit]
        data = [self._batch(job) for job in page]
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": len(jobs) > limit})

    async def cancel(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        job = self.engine.get(request.path_params["batch_id"])
        if job is None or not job.batch_id.startswith("batch_"):
            return _error(404, f"No batch found with id '{request.path_params['batch_id']}'.", param="batch_id")
        if job.failed is not None or job.phase(time.time()) == "ended":
            return _error(400, f"Cannot cancel a batch with status '{self._status(job)}'.")
        self.engine.cancel(job)
        return JSONResponse(self._batch(job))

    # -- the Batch object -------------------------------------------------------------------

    def _status(self, job: BatchJob, now: float | None = None) -> str:
        if job.failed is not None:
            return "failed"
        phase = job.phase(time.time() if now is None else now)
        if phase == "ended":
            return "cancelled" if job.cancelled_at is not None else "expired" if job.expired else "completed"
        return phase

    def _batch(self, job: BatchJob) -> dict[str, Any]:
        status = self._status(job, self.engine.advance(job))
        created = int(job.created_at)
        s = job.settings
        batch: dict[str, Any] = {
            "id": job.batch_id, "object": "batch", "endpoint": job.extra["endpoint"], "errors": None,
            "input_file_id": job.extra["input_file_id"], "completion_window": "24h", "status": status,
            "output_file_id": None, "error_file_id": None, "created_at": created,
            "in_progress_at": None, "expires_at": created + _WINDOW_S, "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
            "cancelled_at": None, "metadata": job.extra.get("metadata"),
            "model": job.items[0].body.get("model") if job.items else None,
            "request_counts": {"total": len(job.items), "completed": job.count("succeeded"),
                               "failed": job.count("errored", "expired", "canceled")},
        }
        if status == "failed":
            batch.update(failed_at=job.extra.get("failed_at"), errors={"object": "list", "data": job.failed},
                         request_counts={"total": 0, "completed": 0, "failed": 0})
            return batch
        if status not in ("validating",):
            batch["in_progress_at"] = int(job.created_at + s.validate_s)
        if job.cancelled_at is not None:
            batch["cancelling_at"] = int(job.cancelled_at)
        if status in ("finalizing", "completed", "expired"):
            batch["finalizing_at"] = int(job.created_at + s.validate_s + s.run_s)
        if status in ("completed", "expired", "cancelled"):
            ended = int(job.ended_at())
            batch[{"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[status]] = ended
            self._write_files(job)
            batch["output_file_id"] = job.extra.get("output_file_id")
            batch["error_file_id"] = job.extra.get("error_file_id")
        return batch

    def _write_files(self, job: BatchJob) -> None:
        """The output and error files, once (in answering order: not the input's)."""
        if "files_written" in job.extra:
            return
        output: list[str] = []
        errors: list[str] = []
        ordered = [job.items[index] for index in job.order]
        for item in ordered:
            line: dict[str, Any] = {"id": "batch_req_" + secrets.token_hex(12), "custom_id": item.custom_id}
            if item.outcome in ("succeeded", "errored"):
                line.update(response={"status_code": item.status, "request_id": "req_" + secrets.token_hex(12),
                                      "body": item.answer}, error=None)
            elif item.outcome == "expired":
                line.update(response=None, error={"code": "batch_expired", "message": (
                    "This request could not be executed before the completion window expired.")})
            else:
                line.update(response=None, error={"code": "batch_cancelled", "message": (
                    "This request was not executed because the batch was cancelled.")})
            (output if item.outcome == "succeeded" else errors).append(json.dumps(line))
        if output:
            job.extra["output_file_id"] = self.engine.add_file(
                f"{job.batch_id}_output.jsonl", "batch_output", ("\n".join(output) + "\n").encode()).file_id
        if errors:
            job.extra["error_file_id"] = self.engine.add_file(
                f"{job.batch_id}_error.jsonl", "batch_output", ("\n".join(errors) + "\n").encode()).file_id
        job.extra["files_written"] = True


def _file_object(file_id: str, filename: str, purpose: str, size: int, created_at: int) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": size, "created_at": created_at, "filename": filename,
            "purpose": purpose, "status": "processed", "expires_at": None, "status_details": None}


def openai_batch_routes(engine: BatchEngine, protocols: list[WireProtocol]) -> list[BaseRoute]:
    """The routes, when the server speaks OpenAI's chat protocol (which answers the items)."""
    named = {protocol.name: protocol for protocol in protocols}
    by_endpoint = {endpoint: named[name] for endpoint, name in _PROTOCOL_OF_ENDPOINT.items() if name in named}
    chat = named.get("openai")
    return _OpenAIBatches(engine, chat, by_endpoint).routes() if chat is not None else []
