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

import json
import re
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from datus.testing.fake_server import FakeProviderServer
from datus_queue.tasks.cli.services import local_redis
from tests.docs_runner import (
    KEY,
    PROVIDER_KEYS,
    ROOT,
    Block,
    ReadmeModel,
    Run,
    readme_blocks,
    user_env,
)

README = ROOT / "README.md"


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """A directory as a user of the repository's conf/agent.yml has it."""
    (tmp_path / "conf").mkdir()
    shutil.copy(ROOT / "conf" / "agent.yml", tmp_path / "conf" / "agent.yml")
    (tmp_path / "home").mkdir()
    return tmp_path


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
        exits = run.run_all(blocks)

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


