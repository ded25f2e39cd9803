"""The README, run as a user runs it: every fenced ``bash`` and ``python`` block, in order.

Commands go through the installed console scripts (``dq``, ``celery``), in subprocesses, in
a fresh directory holding ``conf/agent.yml`` (the repository's own), with the environment a
user of that config sets: provider keys and base URLs (pointing at the fake provider server,
which answers the bundled sample's questions as ``dq demo`` does) and ``HOME`` in the test's
directory. What the README writes as a deployment's address (``export DQ_REDIS_URL=...``) is
given this test's private Redis and job store instead; ``JOB_ID`` and ``BATCH_ID`` become the
ids the commands before them printed. Long-running commands (a worker, Flower, the fake
server) are started, waited for until ready, used by the commands after them, and stopped
with SIGTERM at the end; they must exit cleanly.

Nothing here restates a command: they are read from README.md, so a command that stops
working, or a new one that does not work, fails this test. `test_a_broken_command_fails_the_run`
shows that it would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from datus.testing.fake_server import FakeProviderServer
from datus.testing.script import Reply, ScriptedRequest
from tasks.cli.demo import SampleModel
from tasks.cli.services import local_redis

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
KEY = "sk-readme-not-a-real-key"
BIN = Path(sys.executable).parent
PROVIDER_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "DEEPSEEK_API_KEY", "QWEN_API_KEY", "GEMINI_API_KEY")
# commands the README shows that this test does not run, and why
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
    deployment: dict[str, str]  # what this test gives the names the README exports
    placeholders: dict[str, str] = field(default_factory=dict)
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
        assert done.returncode == 0, f"README line {block.line}: the python block failed:\n{done.stderr[-3000:]}"
        self.outputs.append(([f"python block at line {block.line}"], done.stdout))

    def command(self, argv: list[str], line: int) -> None:
        if argv[0] == "export":
            name, _, value = argv[1].partition("=")
            self.env[name] = self.deployment.get(name, value)
            return
        if any(tuple(argv[:len(prefix)]) == prefix for prefix in NOT_RUN):
            return
        argv = [self.placeholders.get(arg, arg) for arg in argv]
        for probe in READY_PROBES:
            if probe.matches(argv):
                self.start(argv, line, probe)
                return
        done = subprocess.run(argv, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=600,
                              stdin=subprocess.DEVNULL)
        shown = shlex.join(argv)
        assert done.returncode == 0, (f"README line {line}: `{shown}` exited {done.returncode}:\n"
                                      f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        self.outputs.append((argv, done.stdout))
        self.learn_ids(argv, done.stdout)

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
            assert proc.poll() is None, (f"README line {line}: `{shlex.join(argv)}` exited {proc.returncode} "
                                         f"at start:\n{started.output()[-3000:]}")
            assert time.monotonic() < deadline, f"README line {line}: `{shlex.join(argv)}` never became ready"
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
    ReadyProbe(("celery",), lambda bg: _http_up(f"http://127.0.0.1:{_port_of(bg.argv, 5555)}/healthcheck"),
               clean_exits=(0, -signal.SIGTERM)),
    ReadyProbe(("python", "-m", "datus.testing.fake_server"),
               lambda bg: _http_up(f"http://127.0.0.1:{_port_of(bg.argv, 8900)}/_fake/health"),
               clean_exits=(0, -signal.SIGTERM)),
)


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """A directory as a user of the repository's conf/agent.yml has it."""
    (tmp_path / "conf").mkdir()
    shutil.copy(ROOT / "conf" / "agent.yml", tmp_path / "conf" / "agent.yml")
    (tmp_path / "home").mkdir()
    return tmp_path


def user_env(home: Path, fake: FakeProviderServer | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DQ_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1", COLUMNS="200")
    if fake is not None:
        env.update({name: KEY for name in PROVIDER_KEYS})
        env.update(OPENAI_BASE_URL=fake.openai_base_url, DEEPSEEK_BASE_URL=fake.openai_base_url,
                   QWEN_BASE_URL=fake.openai_base_url, ANTHROPIC_BASE_URL=fake.url, GEMINI_BASE_URL=fake.url)
    return env


@pytest.fixture
def fake() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(api_key=KEY) as server:
        server.script.reset(fallback=ReadmeModel())
        yield server


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_readme_block_runs_as_written(user_dir: Path, fake: FakeProviderServer) -> None:
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert {b.lang for b in blocks} == {"bash", "python"} and len(blocks) >= 8, "the README lost its examples"
    with local_redis(user_dir) as redis_url:
        run = Run(user_dir, user_env(user_dir / "home", fake), deployment={
            "DQ_REDIS_URL": redis_url, "DQ_DATABASE_URL": f"sqlite:///{user_dir / 'jobs.db'}"})
        try:
            for block in blocks:
                run.block(block)
        finally:
            exits = run.stop()
    for argv, code in exits.items():
        probe = next(p for p in READY_PROBES if p.matches(shlex.split(argv)))
        assert code in probe.clean_exits, f"`{argv}` did not stop cleanly on SIGTERM (exit {code})"

    # what the commands said, beyond exiting 0
    assert any("dq worker" in argv for argv in exits), "the README starts a worker"
    assert any("dq beat" in argv for argv in exits), "the README starts the scheduler"
    assert any(out.startswith("no dead letters") for out in run.output_of("dq", "dead", "list"))
    submitted = run.output_of("dq", "submit")
    assert submitted and all("final_response" in out for out in submitted), "a streamed job ends with its answer"
    assert any('"status": "succeeded"' in out for out in run.output_of("dq", "result"))
    summaries = run.output_of("dq", "batch")
    assert summaries and all("execution accuracy" in out for out in summaries)
    assert any("(16/20)" in out for out in summaries), "the sample scores as the demo says (16 of 20)"
    assert run.output_of("dq", "status", run.placeholders["BATCH_ID"]), "the batch's status was asked"
    tool_calls = [r for r in fake.requests if "list_tables" in json.dumps(r.body)]
    assert tool_calls, "the tool runs offered the SQL tools to the model"


def test_the_demo_runs_on_a_fresh_machine(user_dir: Path) -> None:
    """The README's first command, with nothing set: no keys, no Redis URL, no config."""
    env = user_env(user_dir / "home", fake=None)
    for name in PROVIDER_KEYS:
        env.pop(name, None)
    first = readme_blocks(README.read_text(encoding="utf-8"))[0]
    demo = next(argv for argv in first.commands() if argv[0] == "dq")
    assert demo == ["dq", "demo"]
    done = subprocess.run(demo, cwd=user_dir, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("execution accuracy") == 2 and "stopped everything" in done.stdout


def test_a_broken_command_fails_the_run(user_dir: Path) -> None:
    """A README with a command that does not work fails the run, naming the command."""
    broken = readme_blocks("```bash\ndq sample .\ndq worker --provider openai --no-such-option\n```\n")
    run = Run(user_dir, user_env(user_dir / "home", fake=None), deployment={})
    with pytest.raises(AssertionError, match="no-such-option"):
        for block in broken:
            run.block(block)
    run.stop()
    unknown = readme_blocks("```bash\ndq status 12345\n```\n")
    with pytest.raises(AssertionError, match="no job or batch '12345'"):
        run.block(unknown[0])


def test_commands_are_read_as_a_shell_reads_them() -> None:
    block = readme_blocks(textwrap.dedent('''\
        ```bash
        export DQ_CONFIG=conf/agent.yml           # a comment
        dq submit "How many orders?" --model deepseek --stream
        dq result JOB_ID;  dq stream JOB_ID --after 3
        dq batch q.csv --model claude \\
                 --mode tool_run   # continued
        pip install -e '.[dev]' && dq demo
        ```
        '''))[0]
    assert block.commands() == [
        ["export", "DQ_CONFIG=conf/agent.yml"],
        ["dq", "submit", "How many orders?", "--model", "deepseek", "--stream"],
        ["dq", "result", "JOB_ID"], ["dq", "stream", "JOB_ID", "--after", "3"],
        ["dq", "batch", "q.csv", "--model", "claude", "--mode", "tool_run"],
        ["pip", "install", "-e", ".[dev]"], ["dq", "demo"],
    ]


def test_indented_blocks_are_found() -> None:
    text = "1. a module:\n\n   ```python\n   import os\n   ```\n"
    assert readme_blocks(text) == [Block("python", "import os\n", 3)]


def test_worker_command_of_the_issue_serves_both_queues(user_dir: Path) -> None:
    """`dq worker --provider openai --provider claude -c 100` consumes llm.openai and llm.claude."""
    with local_redis(user_dir) as redis_url:
        env = user_env(user_dir / "home", fake=None) | {"DQ_REDIS_URL": redis_url,
                                                         "DQ_DATABASE_URL": f"sqlite:///{user_dir / 'jobs.db'}"}
        run = Run(user_dir, env, deployment={})
        run.command(["dq", "worker", "--provider", "openai", "--provider", "claude", "-c", "100"], 0)
        try:
            out = run.background[0].output()
        finally:
            codes = run.stop()
    assert list(codes.values()) == [0]
    queues = re.findall(r"^\s*\.> (llm\.\S+)\s+exchange=", out, re.MULTILINE)
    assert sorted(queues) == ["llm.claude", "llm.openai"], out[-2000:]
    assert re.search(r"concurrency: 100\b", out)


