"""The fake provider server in a process of its own (``python -m datus.testing.fake_server``), as a
provider is: its clock — when a request arrived, what its limit windows hold — is not stalled by
the caller's threads, as an in-process `FakeProviderServer` thread's can be (one GIL).

Where the OS lets it (root, or CAP_SYS_NICE), the process also runs at a higher scheduling
priority (nice -10): a provider is on hardware of its own, and on a machine whose cores the
callers keep busy, a server waiting for a core would stamp arrivals late by that wait — spread
that is not the callers' and that no limiter could absorb."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator

__all__ = ["fake_server_process"]

_LISTENING = re.compile(r"listening on (http://\S+)")


@contextlib.contextmanager
def fake_server_process(*options: str) -> Iterator[str]:
    """Start the server with ``options`` (more of its command line: ``--latency-ms 100``,
    ``--api-key K``, ``--requests-per-minute 600 --window-s 2``); yield its URL once it listens;
    SIGTERM it at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "datus.testing.fake_server", "--port", "0", "--nice", "-10",
                             *options], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # its first line says where it listens (empty: it exited)
        found = _LISTENING.search(line)
        if found is None:
            raise RuntimeError(f"the fake provider server did not start (exit code {proc.poll()}): {line!r}")
        yield found.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
