"""`.ci/lowest.txt` pins the lowest release of every range pyproject.toml declares, and CI's third
leg runs the tests on exactly those: this keeps the two files in step, so a raised bound (or a
new dependency) cannot leave the low end untested."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOWEST = ROOT / ".ci" / "lowest.txt"
TEST_TOOLS = {"pytest", "pytest-asyncio", "pytest-timeout", "ruff"}  # run the tests; no user gets them
# bounds a dependency of ours raises: the lowest a user can install is above what we declare
RAISED = {"httpx": "google-genai 1.61 needs httpx >= 0.28.1 (Datus-agent's env has 0.27.2, tested in leg 2)"}


def _declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"]) + [line for extra in project["optional-dependencies"].values()
                                             for line in extra]
    requirements = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in requirements if canonicalize_name(r.name) not in TEST_TOOLS}


def _pinned() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in LOWEST.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _lower_bound(requirement: Requirement) -> Version:
    bounds = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    assert len(bounds) == 1, f"{requirement}: one '>=' bound expected"
    return bounds[0]


def test_every_declared_dependency_is_pinned_at_its_lowest_release() -> None:
    declared, pinned = _declared(), _pinned()
    assert sorted(set(declared) - set(pinned)) == [], "add these to .ci/lowest.txt at their lower bound"
    for name, requirement in declared.items():
        pin, bound = pinned[name], _lower_bound(requirement)
        assert requirement.specifier.contains(pin, prereleases=True), f"{name}=={pin} is outside {requirement}"
        if name in RAISED:
            continue
        # the bound itself, or its first release when the bound names a series (celery-redbeat>=2.4: 2.4.1)
        assert pin.release[:len(bound.release)] == bound.release, (
            f"{name}: .ci/lowest.txt pins {pin}, pyproject.toml declares >= {bound}")
