"""Running a document's fenced ``bash`` and ``python`` blocks as written, in order: the README
(tests/test_readme.py) and the runbook (tests/test_runbook.py).

Commands go through the installed console scripts, in subprocesses, in the given directory and
environment (``$VAR`` in an argument is the environment's, as a shell would expand it).
``export NAME=value`` sets a variable — with the run's ``deployment`` value where the document
writes a deployment's address. Placeholders (``JOB_ID``, ``BATCH_ID``, ``DEAD_ID``, ``HOST``)
become what the commands before them printed, or what the test gives. Long-running commands (a
worker, a beat, Flower, the exporter, the fake server) are started, waited for until ready, used
by the commands after them, and stopped with SIGTERM at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from datus.models.scripted import Reply, ScriptedRequest
from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.cli.demo import SampleModel

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-readme-not-a-real-key"
BIN = Path(sys.executable).parent
PROVIDER_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "DEEPSEEK_API_KEY", "QWEN_API_KEY", "GEMINI_API_KEY")
# commands the README shows that its test does not run, and why
NOT_RUN = {
    ("pip", "install"): "CI installs the package before it runs the tests",
    ("python", "-m", "pytest"): "the test suite itself, this test included",
}
READY_S = 90.0
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                    re.MULTILINE | re.DOTALL)


# -- reading the README ------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    lang: str
    body: str
    line: int  # where the block starts in the README

    def commands(self) -> list[list[str]]:
        """The block's shell commands as argument lists: continuations joined, comments
        dropped, ``;`` and ``&&`` separating commands."""
        text = re.sub(r"\\\n", " ", self.body)
        out: list[list[str]] = []
        for line in text.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&")
            lexer.whitespace_split = True
            current: list[str] = []
            for token in lexer:
                if token in (";", "&&"):
                    if current:
                        out.append(current)
                    current = []
                else:
                    current.append(token)
            if current:
                out.append(current)
        return out


def readme_blocks(text: str) -> list[Block]:
    return [Block(m["lang"], textwrap.dedent(m["body"]), text.count("\n", 0, m.start()) + 1)
            for m in _FENCE.finditer(text) if m["lang"] in ("bash", "python")]


# -- the fake provider's answers ---------------------------------------------------------------


class ReadmeModel:
    """`SampleModel` (the SQL of a sample question, tools first in a tool run), answering in
    JSON when the request asks for JSON."""

    def __init__(self) -> None:
        self.sample = SampleModel()

    def __call__(self, request: ScriptedRequest) -> Reply:
        reply = self.sample(request)
        if reply.tool_calls:
            return reply
        body = json.dumps(request.body)
        if "response_format" in request.body or "JSON" in body or "json_schema" in body:
            sql = reply.text.split("```sql\n", 1)[-1].split("\n```", 1)[0] if "```sql" in reply.text else "SELECT 1"
            return Reply(text=json.dumps({"sql": sql, "explanation": "the rows that answer the question"}))
        return reply


# -- running it ----------------------------------------------------------------------------------


@dataclass
class Background:
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@dataclass
class Run:
    """One pass over the README's blocks in ``cwd`` with ``env``."""

    cwd: Path
    env: dict[str, str]
    deployment: dict[str, str]  # what the test gives the names the document exports
    placeholders: dict[str, str] = field(default_factory=dict)
    not_run: dict[tuple[str, ...], str] = field(default_factory=lambda: dict(NOT_RUN))
    where: str = "README"
    background: list[Background] = field(default_factory=list)
    outputs: list[tuple[list[str], str]] = field(default_factory=list)

    def block(self, block: Block) -> None:
        if block.lang == "python":
            self.python(block)
            return
        for argv in block.commands():
            self.command(argv, block.line)

    def python(self, block: Block) -> None:
        script = self.cwd / f"readme_line_{block.line}.py"
        script.write_text(block.body, encoding="utf-8")
        done = subprocess.run([sys.executable, str(script)], cwd=self.cwd, env=self.env, capture_output=True,
                              text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"{self.where} line {block.line}: the python block failed:\n{done.stderr[-3000:]}"
        self.outputs.append(([f"python block at line {block.line}"], done.stdout))

    def command(self, argv: list[str], line: int) -> None:
        if argv[0] == "export":
            name, _, value = argv[1].partition("=")
            self.env[name] = self.deployment.get(name, value)
            return
        if any(tuple(argv[:len(prefix)]) == prefix for prefix in self.not_run):
            return
        argv = [self._expand(self.placeholders.get(arg, arg)) for arg in argv]
        for probe in READY_PROBES:
            if probe.matches(argv):
                self.start(argv, line, probe)
                return
        done = subprocess.run(argv, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=600,
                              stdin=subprocess.DEVNULL)
        shown = shlex.join(argv)
        assert done.returncode == 0, (f"{self.where} line {line}: `{shown}` exited {done.returncode}:\n"
                                      f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        self.outputs.append((argv, done.stdout))
        self.learn_ids(argv, done.stdout)

    def _expand(self, arg: str) -> str:
        for name, value in self.placeholders.items():  # inside an argument too: -d dq-openai-2@HOST
            arg = re.sub(rf"(?<=[@/=]){name}\b", value, arg)
        return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: self.env.get(m.group(1), ""), arg)

    def learn_ids(self, argv: list[str], stdout: str) -> None:
        if argv[:2] == ["dq", "submit"]:
            self.placeholders["JOB_ID"] = stdout.split()[0]
        if argv[:2] == ["dq", "batch"] and (found := re.search(r"\bb-[0-9a-f]{16}\b", stdout)):
            self.placeholders["BATCH_ID"] = found.group(0)

    def start(self, argv: list[str], line: int, probe: ReadyProbe) -> None:
        log = self.cwd / f"background-{len(self.background) + 1}-{argv[0]}.log"
        with log.open("wb") as handle:
            proc = subprocess.Popen(argv, cwd=self.cwd, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        started = Background(argv, proc, log)
        self.background.append(started)
        deadline = time.monotonic() + READY_S
        while not probe.ready(started):
            assert proc.poll() is None, (f"{self.where} line {line}: `{shlex.join(argv)}` exited {proc.returncode} "
                                         f"at start:\n{started.output()[-3000:]}")
            assert time.monotonic() < deadline, f"{self.where} line {line}: `{shlex.join(argv)}` never became ready"
            time.sleep(0.1)

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every long-running command (as a supervisor would); their exit codes."""
        for started in self.background:
            with contextlib.suppress(ProcessLookupError):
                started.proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for started in self.background:
            try:
                codes[shlex.join(started.argv)] = started.proc.wait(60)
            except subprocess.TimeoutExpired:
                codes[shlex.join(started.argv)] = None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(started.proc.pid, signal.SIGKILL)  # leftovers (MCP servers)
        return codes

    def run_all(self, blocks: list[Block]) -> dict[str, int | None]:
        """Every block in order, then every long-running command stopped; asserts each one
        stopped cleanly and returns their exit codes."""
        try:
            for block in blocks:
                self.block(block)
        finally:
            exits = self.stop()
        for argv, code in exits.items():
            probe = next(p for p in READY_PROBES if p.matches(shlex.split(argv)))
            assert code in probe.clean_exits, f"`{argv}` did not stop cleanly on SIGTERM (exit {code})"
        return exits

    def output_of(self, *prefix: str) -> list[str]:
        return [out for argv, out in self.outputs if tuple(argv[:len(prefix)]) == prefix]


@dataclass(frozen=True)
class ReadyProbe:
    prefix: tuple[str, ...]
    ready: Callable[[Background], bool]
    clean_exits: tuple[int, ...] = (0,)

    def matches(self, argv: list[str]) -> bool:
        return tuple(argv[:len(self.prefix)]) == self.prefix


def _http_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # it answered (Flower: 401 without credentials)
    except OSError:
        return False


def _port_of(argv: list[str], default: int) -> int:
    for index, arg in enumerate(argv):
        if arg.startswith("--port="):
            return int(arg.split("=", 1)[1])
        if arg == "--port":
            return int(argv[index + 1])
    return default


READY_PROBES = (
    ReadyProbe(("dq", "worker"), lambda bg: " ready." in bg.output()),
    ReadyProbe(("dq", "beat"), lambda bg: "beat: Acquired lock" in bg.output()),
    ReadyProbe(("dq", "metrics"), lambda bg: _http_up(f"http://127.0.0.1:{_port_of(bg.argv, 9110)}/metrics")),
    ReadyProbe(("celery", "-A", "datus_queue", "flower"), lambda bg: _http_up(f"http://127.0.0.1:{_port_of(bg.argv, 5555)}/healthcheck"),
               clean_exits=(0, -signal.SIGTERM)),
    ReadyProbe(("python", "-m", "datus.testing.fake_server"),
               lambda bg: _http_up(f"http://127.0.0.1:{_port_of(bg.argv, 8900)}/_fake/health"),
               clean_exits=(0, -signal.SIGTERM)),
)


def user_env(home: Path, fake: FakeProviderServer | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DQ_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1", COLUMNS="200")
    if fake is not None:
        env.update({name: KEY for name in PROVIDER_KEYS})
        env.update(OPENAI_BASE_URL=fake.openai_base_url, DEEPSEEK_BASE_URL=fake.openai_base_url,
                   QWEN_BASE_URL=fake.openai_base_url, ANTHROPIC_BASE_URL=fake.url, GEMINI_BASE_URL=fake.url)
    return env


