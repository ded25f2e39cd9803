"""Installing this project next to Datus-agent never breaks Datus.

The wheel carries only the model layer of the ``datus`` namespace (``datus/models``, plus
``datus/testing`` and ``datus/mcp_servers``, paths Datus-agent does not have) and the job
system under ``datus_queue``: checked on the built wheel everywhere. Where Datus-agent is
installed (CI's Python 3.12 leg: ``pip install datus-agent==0.2.2`` then ``pip install .``),
its files outside ``datus/models/`` are byte for byte what it shipped, ``pip check`` is clean and
``datus --help`` runs.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from tests.datus_compat.conftest import datus_installed

REPO = Path(__file__).resolve().parents[2]
OURS_IN_DATUS = ("datus/models/", "datus/testing/", "datus/mcp_servers/")
needs_datus = pytest.mark.skipif(not datus_installed(), reason="Datus-agent is not installed here (CI's 3.12 leg)")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not all((REPO / part).exists() for part in ("setup.py", "tasks", "datus")):
        pytest.skip("no source tree here (CI's Datus leg runs a copy of tests/ against the installed package)")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    [built] = out.glob("datus_queue-*.whl")
    return built


def test_the_wheel_holds_no_datus_file_outside_the_model_layer(wheel: Path) -> None:
    names = [name for name in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in name]
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"datus", "datus_queue"}, top  # no top-level tasks/, workers/, scheduler/
    strays = [name for name in names if name.startswith("datus/") and not name.startswith(OURS_IN_DATUS)]
    assert strays == []  # datus/__init__.py, configuration/, schemas/, utils/ are Datus-agent's (or standalone/'s)
    for package in ("tasks", "workers", "scheduler"):
        assert f"datus_queue/{package}/__init__.py" in names


def _digest(path: Path) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()


@needs_datus
def test_datus_agents_files_outside_the_model_layer_are_untouched() -> None:
    datus = metadata.distribution("datus-agent")
    changed = []
    for file in datus.files or []:
        if file.hash is None or str(file).startswith("datus/models/"):
            continue
        if file.hash.mode == "sha256" and _digest(Path(file.locate())) != file.hash.value:
            changed.append(str(file))
    assert changed == []


@needs_datus
def test_the_model_layer_is_ours_and_the_shared_modules_are_datus_agents() -> None:
    """What Datus imports as datus.models is this project's files; what the model layer imports
    from outside itself (exceptions, action history) is Datus-agent's own."""
    import datus.models.base
    import datus.schemas.action_history
    import datus.utils.exceptions

    site = Path(datus.utils.exceptions.__file__).resolve().parents[2]
    ours = {str(f): f.hash for f in metadata.distribution("datus-queue").files or [] if f.hash is not None}
    base = Path(datus.models.base.__file__).resolve()
    assert _digest(base) == ours[str(base.relative_to(site))].value
    datus_files = {str(f) for f in metadata.distribution("datus-agent").files or []}
    for module in (datus.utils.exceptions, datus.schemas.action_history):
        assert str(Path(module.__file__).resolve().relative_to(site)) in datus_files


@needs_datus
def test_pip_check_is_clean_and_datus_runs() -> None:
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    datus_cli = Path(sys.executable).with_name("datus")
    run = subprocess.run([str(datus_cli), "--help"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "usage: datus" in run.stdout, run.stderr[-2000:]
