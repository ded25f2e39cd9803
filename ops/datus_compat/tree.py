"""The temporary tree Datus-agent's model tests run in, per mode.

Nothing of Datus is committed here: the tree is made from a Datus-agent source the caller
names (a checkout, an sdist ``.tar.gz``, or ``pypi`` to download the sdist of
``datus-agent==0.2.2``), in a temporary directory.

* ``standalone``: the four model test files and their support files (``tests/conftest.py``,
  ``tests/test_tracing.py``, ``tests/conf/agent.yml``, ``pytest.ini``) only, plus the stand-ins
  for the Datus modules outside the model layer (``standins/``); ``datus`` stays a namespace,
  the rest of it comes from the installed distributions.
* ``replaced``: the whole source with ``datus/models/`` replaced by this project's.
* ``baseline``: the whole source as it is.

In every mode ``tests/data/SSB.db`` is built (`ssb.build_ssb`), a support file the source
lacks (the sdist has no ``tests/conftest.py`` nor ``tests/conf/agent.yml``) is taken from
``standins/tests``, and every model's ``base_url`` in ``tests/conf/agent.yml`` is pointed at
the fake server (`point_at_fakes`); API keys stay the ``${VAR}`` references the file has.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import yaml
from ssb import build_ssb

__all__ = ["MODEL_TEST_FILES", "build_tree", "point_at_fakes", "resolve_source"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STANDINS = HERE / "standins"
MODEL_TEST_FILES = ("tests/test_claude_model.py", "tests/test_deepseek_model.py", "tests/test_qwen_model.py",
                    "tests/test_other_models.py")
SUPPORT_FILES = ("tests/conftest.py", "tests/test_tracing.py", "tests/conf/agent.yml")
PYPI_SDIST = "datus-agent==0.2.2"
_PYTEST_INI = """[pytest]
# written by ops/datus_compat: the source had no pytest.ini
pythonpath = .
testpaths = tests
markers =
    acceptance: mark tests as "acceptance_test"
filterwarnings =
    ignore::DeprecationWarning
    ignore::pytest.PytestReturnNotNoneWarning
"""
_IGNORED = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".pytest_cache", ".venv", "*.egg-info")
# where each provider type's SDK expects the fake: OpenAI-style clients add /chat/completions,
# Anthropic's adds /v1/messages, Gemini's reads the API version off the end
_BASE_PATHS = {"claude": "", "anthropic": "", "gemini": "/v1beta"}


def resolve_source(source: str, scratch: Path, python: str) -> Path:
    """A Datus-agent source tree for ``source``: a directory as is, an sdist extracted under
    ``scratch``, or ``pypi``: the sdist of ``datus-agent==0.2.2`` downloaded with ``python``'s
    pip (as for Python 3.12, which the package requires, whatever ``python`` is)."""
    if source == "pypi":
        download = scratch / "sdist"
        subprocess.run([python, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "--python-version", "3.12", PYPI_SDIST, "-d", str(download)], check=True)
        source = str(next(download.glob("datus_agent-*.tar.gz")))
    path = Path(source).expanduser().resolve()
    if path.is_dir():
        return path
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path) as archive:
            archive.extractall(scratch / "src", filter="data")
        tops = [child for child in (scratch / "src").iterdir() if child.is_dir()]
        if len(tops) != 1:
            raise ValueError(f"{path} does not hold one top directory")
        return tops[0]
    raise ValueError(f"{source!r} is neither a Datus-agent source directory, an sdist, nor 'pypi'")


def _copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def build_tree(mode: str, source: Path, tree: Path) -> None:
    missing = [name for name in MODEL_TEST_FILES if not (source / name).is_file()]
    if missing:
        raise ValueError(f"{source} is not a Datus-agent source: {', '.join(missing)} missing")
    if mode == "standalone":
        for name in (*MODEL_TEST_FILES, *SUPPORT_FILES, "pytest.ini"):
            if (source / name).is_file():
                _copy_file(source / name, tree / name)
        shutil.copytree(STANDINS / "datus", tree / "datus", ignore=_IGNORED)
    else:
        shutil.copytree(source, tree, ignore=_IGNORED, symlinks=True)
        if mode == "replaced":
            shutil.rmtree(tree / "datus" / "models")
            shutil.copytree(ROOT / "datus" / "models", tree / "datus" / "models", ignore=_IGNORED)
    for name in SUPPORT_FILES:
        if not (tree / name).is_file():
            _copy_file(STANDINS / name, tree / name)
    if not (tree / "pytest.ini").is_file():
        (tree / "pytest.ini").write_text(_PYTEST_INI, encoding="utf-8")
    build_ssb(tree / "tests" / "data" / "SSB.db")


def point_at_fakes(agent_yml: Path, fake_url: str) -> dict[str, str]:
    """Rewrite every model's ``base_url`` to the fake server; returns model name -> base URL."""
    data: dict[str, Any] = yaml.safe_load(agent_yml.read_text(encoding="utf-8"))
    pointed: dict[str, str] = {}
    for name, model in (data.get("agent", {}).get("models") or {}).items():
        model["base_url"] = fake_url + _BASE_PATHS.get(str(model.get("type")), "/v1")
        pointed[name] = model["base_url"]
    header = "# rewritten by ops/datus_compat: base_url -> the fake provider server\n"
    agent_yml.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return pointed
