"""``dq worker --processes N``: N worker processes, one event loop each, behind one parent.

One worker process runs its jobs on one event loop, so it uses one core at most (the GIL); this
is how a machine's other cores are used without Celery's prefork pool (which keeps no calls in
flight on a loop and is refused with a metrics port). The parent starts N children, each
``python -m datus_queue.workers`` with the same arguments minus ``--processes`` (so each takes
``--concurrency`` jobs at once: N times that in all), and supervises them:

- **Signals**: SIGTERM or SIGINT to the parent is sent on to every child (the same signal: a
  soft shutdown on SIGTERM, Celery's warm one on SIGINT) and the parent waits for them all
  (``STOP_GRACE_S``, then SIGKILL: their unacknowledged messages are restored by the broker and
  their jobs by the sweep). The children run in process groups of their own, so a terminal's
  Ctrl-C reaches each of them once, through the parent; each also asks the kernel for a SIGTERM
  should the parent die (``PR_SET_PDEATHSIG``), so none outlives it.
- **A child that dies** (exits while the parent is not stopping) is started again after
  ``RESTART_DELAY_S``; more than ``MAX_RESTARTS`` deaths within ``RESTART_WINDOW_S`` and the
  parent stops the others and exits 1 (something is wrong with every start: a supervisor should
  see it). A clean stop exits 0, or 1 when a child exited non-zero.
- **Metrics**: with ``--metrics-port`` (``DQ_METRICS_PORT``) the parent serves the one
  ``/metrics`` of all of them. Each child serves its own on a private port on 127.0.0.1 (the
  worker's usual code: every metric, the scrape-time ones such as the MCP pools' included), and
  on each scrape the parent reads them all and adds them up: the same series (name and labels)
  of every child summed — counters, histogram buckets, gauges such as ``dq_jobs_in_flight`` —
  except the ``*_created`` timestamps and ``process_start_time_seconds`` (the earliest), and
  ``process_max_fds`` and ``python_info`` (the first child's). The parent adds ``dq_worker_processes`` (children running)
  and ``dq_worker_process_jobs_total{process}`` (jobs that ended in each child, ``process`` its
  index 1..N: how the load is spread). This was chosen over prometheus_client's multiprocess
  mode, which cannot carry the scrape-time collectors and needs every gauge declared with its
  mode. A child's counters go with it when it dies (the sum drops: Prometheus' ``rate()``
  treats that as a counter reset).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_RESTARTS", "RESTART_DELAY_S", "STOP_GRACE_S", "child_setup", "merge_metrics", "supervise"]

logger = logging.getLogger("datus_queue.workers.processes")
STOP_GRACE_S = 60.0
RESTART_DELAY_S = 1.0
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
PARENT_ENV = "DQ_WORKER_PARENT_PID"  # set in a child: the parent it must not outlive
_FIRST = {"process_max_fds", "python_info"}  # a child's value, not a sum
_EARLIEST = {"process_start_time_seconds"}


def child_setup() -> None:
    """In a child (``DQ_WORKER_PARENT_PID`` set): a SIGTERM when the parent dies."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # the parent died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class _Child:
    index: int
    metrics_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    deaths: list[float] = field(default_factory=list)
    restart_at: float | None = None


class Supervisor:
    def __init__(self, argv: Callable[[int], list[str]], processes: int, metrics_port: int | None,
                 metrics_addr: str) -> None:
        self.argv, self.metrics_port, self.metrics_addr = argv, metrics_port, metrics_addr
        self.children = [_Child(i + 1) for i in range(processes)]
        self._stop_signal: int | None = None
        self._failed = False

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        server = self._serve_metrics() if self.metrics_port is not None else None
        logger.info("dq worker: %d processes (pid %d supervises)", len(self.children), os.getpid())
        try:
            for child in self.children:
                self._start(child)
            while self._stop_signal is None and not self._failed:
                self._watch()
                time.sleep(0.2)
            return self._stop_all()
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum

    def _start(self, child: _Child) -> None:
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        env.pop("DQ_METRICS_PORT", None)
        argv = self.argv(child.index)
        if self.metrics_port is not None:
            child.metrics_port = _free_port()
            env["DQ_METRICS_PORT"], env["DQ_METRICS_ADDR"] = str(child.metrics_port), "127.0.0.1"
        child.proc = subprocess.Popen([sys.executable, "-m", "datus_queue.workers", *argv], env=env,
                                      start_new_session=True)
        child.restart_at = None
        logger.info("worker process %d started (pid %d)", child.index, child.proc.pid)

    def _watch(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._start(child)
                continue
            assert child.proc is not None
            code = child.proc.poll()
            if code is None:
                continue
            child.deaths = [t for t in child.deaths if now - t < RESTART_WINDOW_S] + [now]
            if len(child.deaths) > MAX_RESTARTS:
                logger.error("worker process %d (pid %d) exited with %s, %d times in %.0fs: stopping", child.index,
                             child.proc.pid, code, len(child.deaths), RESTART_WINDOW_S)
                self._failed = True
                return
            logger.warning("worker process %d (pid %d) exited with %s; starting it again in %.0fs", child.index,
                           child.proc.pid, code, RESTART_DELAY_S)
            child.restart_at = now + RESTART_DELAY_S

    def _stop_all(self) -> int:
        signum = self._stop_signal or signal.SIGTERM
        running = [c.proc for c in self.children if c.proc is not None and c.restart_at is None and c.proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)
        deadline = time.monotonic() + STOP_GRACE_S
        codes = []
        for proc in running:
            try:
                codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                logger.warning("worker process pid %d still running after %.0fs: killed", proc.pid, STOP_GRACE_S)
                proc.kill()
                codes.append(proc.wait())
        if self._failed:
            return 1
        return 0 if all(code == 0 for code in codes) else 1

    # -- metrics --------------------------------------------------------------------------------

    def _serve_metrics(self) -> http.server.ThreadingHTTPServer:
        supervisor = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/", "/metrics"):
                    self.send_error(404)
                    return
                body = supervisor.metrics_text().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer((self.metrics_addr, self.metrics_port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="dq-metrics", daemon=True).start()
        logger.info("metrics of all %d processes on http://%s:%d/metrics", len(self.children), self.metrics_addr,
                    self.metrics_port)
        return server

    def metrics_text(self) -> str:
        texts: list[tuple[int, str]] = []
        for child in self.children:
            proc = child.proc
            if child.metrics_port is None or proc is None or proc.poll() is not None or child.restart_at is not None:
                continue
            url = f"http://127.0.0.1:{child.metrics_port}/metrics"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
                texts.append((child.index, response.read().decode()))
        return merge_metrics(texts)


def merge_metrics(texts: Iterable[tuple[int, str]]) -> str:
    """The children's expositions (``(index, text)``) as one: see the module's docstring."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    per_process: dict[int, float] = {}
    processes = 0
    for index, text in texts:
        processes += 1
        per_process[index] = 0.0
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            for sample in family.samples:
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                if family.name == "dq_jobs" and sample.name == "dq_jobs_total":
                    per_process[index] += sample.value
                if key not in values:
                    values[key] = sample.value
                elif sample.name.endswith("_created") or family.name in _EARLIEST:
                    values[key] = min(values[key], sample.value)
                elif family.name not in _FIRST:
                    values[key] += sample.value
    for (family_name, name, labels), value in values.items():
        families[family_name].add_sample(name, dict(labels), value)
    up = Metric("dq_worker_processes", "Worker processes of this dq worker answering /metrics", "gauge")
    up.add_sample("dq_worker_processes", {}, processes)
    jobs = Metric("dq_worker_process_jobs", "Jobs that ended in each worker process (process: its index)", "counter")
    for index, count in sorted(per_process.items()):
        jobs.add_sample("dq_worker_process_jobs_total", {"process": str(index)}, count)

    class _Collected:
        def collect(self) -> Iterable[Metric]:
            yield from families.values()
            yield up
            yield jobs

    return generate_latest(_Collected()).decode()  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def supervise(argv: Callable[[int], list[str]], processes: int, metrics_port: int | None, metrics_addr: str) -> int:
    """Run ``processes`` children, child ``i`` (1..N) with the arguments ``argv(i)``."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/dq-worker-parent] %(message)s")
    from datus.models.redact import install_log_redaction

    install_log_redaction()
    return Supervisor(argv, processes, metrics_port, metrics_addr).run()
