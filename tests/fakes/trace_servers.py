"""Local stand-ins for the trace backends, each an HTTP server on a free port in a thread:

- `FakeLangSmith`: the LangSmith API as the ``langsmith`` SDK uses it — ``GET /info``, ``POST
  /runs/multipart`` (multipart/form-data, zstd or not), ``POST /runs/batch``, ``POST /runs``,
  ``PATCH /runs/{id}``. Every body is kept as received; the runs are merged by id (a post, then
  its patch), so a test reads the run tree as LangSmith would store it.
- `OtlpReceiver`: an OTLP/HTTP collector — ``POST /v1/traces`` with a protobuf
  ``ExportTraceServiceRequest``, decoded into plain dicts (ids in hex, attributes as values).
"""

from __future__ import annotations

import email.parser
import email.policy
import gzip
import io
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeLangSmith", "OtlpReceiver", "Received"]


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes  # as it arrived on the wire (before any decompression)


@dataclass
class _Server:
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Any:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                return

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                item = Received(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with owner.lock:
                    owner.received.append(item)
                status, content_type, payload = owner.answer(item)
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_PUT = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name=type(self).__name__, daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def clear(self) -> None:
        with self.lock:
            self.received.clear()

    def bodies(self) -> list[bytes]:
        """Every body received, decompressed as its Content-Encoding says."""
        with self.lock:
            items = list(self.received)
        return [_decoded(item) for item in items]

    def answer(self, item: Received) -> tuple[int, str, bytes]:
        raise NotImplementedError


def _decoded(item: Received) -> bytes:
    encoding = item.headers.get("content-encoding", "")
    if encoding == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(item.body), read_across_frames=True)
        return reader.read()
    if encoding == "gzip":
        return gzip.decompress(item.body)
    return item.body


_INFO = {
    "version": "0.0.0-fake",
    "batch_ingest_config": {"use_multipart_endpoint": True, "size_limit": 100, "size_limit_bytes": 20_971_520,
                            "scale_up_qsize_trigger": 1000, "scale_up_nthreads_limit": 16,
                            "scale_down_nempty_trigger": 4},
    "instance_flags": {"zstd_compression_enabled": True},  # the SDK then sends zstd multipart bodies
}


class FakeLangSmith(_Server):

    def answer(self, item: Received) -> tuple[int, str, bytes]:
        path = item.path.split("?")[0].rstrip("/")
        if item.method == "GET" and path.endswith("/info"):
            return 200, "application/json", json.dumps(_INFO).encode()
        return 200, "application/json", b"{}"

    def runs(self) -> dict[str, dict[str, Any]]:
        """Every run received, by id: its posted fields with its patches applied in order."""
        with self.lock:
            items = list(self.received)
        runs: dict[str, dict[str, Any]] = {}
        for item in items:
            path = item.path.split("?")[0].rstrip("/")
            body = _decoded(item)
            if item.method == "POST" and path.endswith("/runs/multipart"):
                for operation, run_id, fields in _multipart_ops(item.headers["content-type"], body):
                    runs.setdefault(run_id, {"id": run_id}).update(fields)
            elif item.method == "POST" and path.endswith("/runs/batch"):
                batch = json.loads(body)
                for operation in ("post", "patch"):
                    for run in batch.get(operation) or []:
                        runs.setdefault(str(run["id"]), {}).update(run)
            elif item.method == "POST" and path.endswith("/runs"):
                run = json.loads(body)
                runs.setdefault(str(run["id"]), {}).update(run)
            elif item.method == "PATCH" and "/runs/" in path:
                run_id = path.rsplit("/", 1)[-1]
                runs.setdefault(run_id, {"id": run_id}).update(json.loads(body))
        return runs


def _multipart_ops(content_type: str, body: bytes) -> list[tuple[str, str, dict[str, Any]]]:
    """The run operations of one /runs/multipart body: parts named ``post.<id>`` (the run
    minus the fields below), ``post.<id>.inputs`` / ``.outputs`` / ``.extra`` / ``.events`` /
    ``.error`` / ``.serialized``, and the same with ``patch``."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    found: dict[tuple[str, str], dict[str, Any]] = {}
    order: list[tuple[str, str]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition") or ""
        pieces = name.split(".")
        if len(pieces) < 2 or pieces[0] not in ("post", "patch"):
            continue  # attachments
        key = (pieces[0], pieces[1])
        if key not in found:
            found[key] = {}
            order.append(key)
        value = json.loads(part.get_payload(decode=True) or b"null")
        if len(pieces) == 2:
            found[key].update(value)
        else:
            found[key][pieces[2]] = value
    return [(operation, run_id, found[(operation, run_id)]) for operation, run_id in order]


class OtlpReceiver(_Server):
    def answer(self, item: Received) -> tuple[int, str, bytes]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        return 200, "application/x-protobuf", ExportTraceServiceResponse().SerializeToString()

    def spans(self) -> list[dict[str, Any]]:
        """Every span received, decoded: name, kind, trace_id, span_id, parent_span_id (hex, "" for a
        root), attributes, status code and message, the resource's attributes and the scope."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        with self.lock:
            items = [item for item in self.received if item.path.startswith("/v1/traces")]
        spans: list[dict[str, Any]] = []
        for item in items:
            request = ExportTraceServiceRequest()
            request.ParseFromString(_decoded(item))
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        spans.append({
                            "name": span.name, "kind": span.kind, "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(), "parent_span_id": span.parent_span_id.hex(),
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                            "status": span.status.code, "status_message": span.status.message,
                            "resource": resource, "scope": scope_spans.scope.name,
                        })
        return spans


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {item.key: _value(item.value) for item in value.kvlist_value.values}
    return getattr(value, kind) if kind else None
