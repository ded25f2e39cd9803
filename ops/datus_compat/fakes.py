"""The fake provider server for a harness run: one process speaking every wire protocol
(OpenAI-style chat for OpenAI, DeepSeek, Qwen and Kimi — and for Datus's own ClaudeModel, which
sends its plain calls and tool runs through an OpenAI client at ``base_url + "/v1"`` —,
Anthropic messages, Gemini), answering with the ``agent`` fallback, plus the per-test scripted
answers below.

Scripted answers exist only where a test asserts a fact no generic answer can know:

* ``test_other_models.py::TestGeminiModel::test_reasoning_capability`` asserts ``"4"`` in the
  answer to "If I have 3 apples and give away 1, then buy 2 more, how many do I have?".
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Self

__all__ = ["SCRIPTED", "FakeServerProcess"]

SCRIPTED: list[dict[str, Any]] = [
    {"match": "If I have 3 apples and give away 1, then buy 2 more",
     "reply": {"text": "Start with 3 apples; giving away 1 leaves 3 - 1 = 2; buying 2 more gives 2 + 2 = 4. "
                       "You have 4 apples."},
     "times": None},
]
_LISTENING = re.compile(r"listening on (http://\S+)")


class FakeServerProcess:
    """``python -m datus.testing.fake_server --fallback agent`` in a process of its own, run
    with an interpreter that has this project installed."""

    def __init__(self, python: str, log: Path) -> None:
        self.python = python
        self.log = log
        self.url = ""
        self._process: subprocess.Popen[str] | None = None

    def start(self, timeout_s: float = 30.0) -> Self:
        self._process = subprocess.Popen(
            [self.python, "-m", "datus.testing.fake_server", "--port", "0", "--fallback", "agent"],
            stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True)
        deadline = time.monotonic() + timeout_s
        assert self._process.stdout is not None
        while time.monotonic() < deadline:
            line = self._process.stdout.readline()
            if not line and self._process.poll() is not None:
                raise RuntimeError(f"the fake server exited ({self._process.returncode}); see {self.log}")
            found = _LISTENING.search(line)
            if found:
                self.url = found.group(1)
                break
        else:
            self.stop()
            raise RuntimeError(f"the fake server did not start within {timeout_s:.0f}s; see {self.log}")
        self.post("/_fake/script", {"entries": SCRIPTED})
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def post(self, path: str, payload: Any) -> Any:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(), method="POST",
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.load(response)

    def request_counts(self) -> dict[str, int]:
        """Requests the fakes answered, by wire protocol and model ("openai gpt-4o-mini": 7)."""
        requests = self.get("/_fake/requests")["requests"]
        counts = Counter(f"{item['protocol']} {_model_of(item)}" for item in requests)
        return dict(sorted(counts.items()))


def _model_of(request: dict[str, Any]) -> str:
    body = request.get("body")
    if isinstance(body, dict) and body.get("model"):
        return str(body["model"])
    found = re.search(r"/models/([^:/]+)", request.get("path", ""))  # Gemini names it in the path
    return found.group(1) if found else "?"
