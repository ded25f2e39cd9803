"""The run's summary, read from pytest's JUnit XML: passed/failed/errors/skipped per file, and
each failure's first line, marked where the failure is known to come from the harness itself
rather than from the model layer under test; plus the failures Datus's tests only log (its
token-consumption tests log "❌ FAILURE" when no streamed action carries usage, and pass)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

__all__ = ["KNOWN", "Outcome", "as_json", "format_report", "logged_failures", "read_junit"]

# test id -> (modes, why): failures that follow from running against fakes, not from the model layer
KNOWN: dict[str, tuple[tuple[str, ...], str]] = {
    "tests/test_other_models.py::TestKimiModel::test_initialization": (
        ("standalone", "replaced", "baseline"),
        "asserts base_url == https://api.moonshot.cn/v1, which the harness rewrites to the fake"),
    "tests/test_other_models.py::TestGeminiModel::test_generate_basic": (
        ("baseline",), "Datus's GeminiModel (google.generativeai) ignores base_url: it calls Google"),
    "tests/test_other_models.py::TestGeminiModel::test_generate_with_json_output": (
        ("baseline",), "Datus's GeminiModel ignores base_url"),
    "tests/test_other_models.py::TestGeminiModel::test_reasoning_capability": (
        ("baseline",), "Datus's GeminiModel ignores base_url"),
    "tests/test_other_models.py::TestGeminiModel::test_generate_with_mcp": (
        ("baseline",), "Datus's GeminiModel sends tool runs to a hard-coded Google URL"),
}


@dataclass(frozen=True)
class Outcome:
    test_id: str
    file: str
    status: str  # passed | failed | error | skipped
    message: str  # the first line of the failure, error or skip reason
    seconds: float


def _test_id(case: ElementTree.Element) -> tuple[str, str]:
    parts = (case.get("classname") or "").split(".")
    # tests.test_other_models.TestGeminiModel -> tests/test_other_models.py::TestGeminiModel
    split = next((index for index, part in enumerate(parts) if part.startswith("test_")), len(parts) - 1)
    file = "/".join(parts[: split + 1]) + ".py"
    return "::".join([file, *parts[split + 1:], case.get("name", "")]), file


def _first_line(element: ElementTree.Element) -> str:
    text = element.get("message") or element.text or ""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def read_junit(path: Path) -> list[Outcome]:
    outcomes = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        test_id, file = _test_id(case)
        status, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                status, message = {"failure": "failed"}.get(tag, tag), _first_line(found)
                break
        outcomes.append(Outcome(test_id, file, status, message, float(case.get("time") or 0)))
    return outcomes


_TEST_LINE = re.compile(r"^(tests/\S+\.py::\S+)")
_LOGGED_FAILURE = "\u274c"  # the cross mark Datus's tests log a failure they do not assert with


def logged_failures(pytest_log: Path) -> list[tuple[str, str]]:
    """(test id, log line) for every failure a test logged (pytest ran with live logging)."""
    found, current = [], ""
    for line in pytest_log.read_text(encoding="utf-8", errors="replace").splitlines():
        test = _TEST_LINE.match(line)
        if test:
            current = test.group(1)
        elif _LOGGED_FAILURE in line:
            found.append((current, line.strip()))
    return found


def format_report(mode: str, outcomes: list[Outcome], header: dict[str, str], requests: dict[str, int],
                  logged: Sequence[tuple[str, str]] = ()) -> str:
    lines = [f"Datus-agent model tests, mode {mode}"]
    lines += [f"  {key}: {value}" for key, value in header.items()]
    per_file: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for outcome in outcomes:
        per_file[outcome.file][outcome.status] += 1
    columns = ("passed", "failed", "error", "skipped")
    width = max([len(file) for file in per_file] + [5])
    lines += ["", f"  {'file':<{width}}  " + "  ".join(f"{column:>7}" for column in columns)]
    for file in sorted(per_file):
        lines.append(f"  {file:<{width}}  " + "  ".join(f"{per_file[file][column]:>7}" for column in columns))
    totals = {column: sum(counts[column] for counts in per_file.values()) for column in columns}
    lines.append(f"  {'total':<{width}}  " + "  ".join(f"{totals[column]:>7}" for column in columns)
                 + f"   of {len(outcomes)}")
    bad = [outcome for outcome in outcomes if outcome.status in ("failed", "error")]
    if bad:
        lines += ["", "Failures (first line):"]
        for outcome in bad:
            known = KNOWN.get(outcome.test_id)
            note = f"  [harness: {known[1]}]" if known and mode in known[0] else ""
            lines.append(f"  {outcome.status.upper():6} {outcome.test_id}{note}")
            lines.append(f"         {outcome.message[:300]}")
    if logged:
        lines += ["", "Failures the tests only logged:"]
        lines += [f"  {test_id}\n         {line[:300]}" for test_id, line in logged]
    skipped = [outcome for outcome in outcomes if outcome.status == "skipped"]
    if skipped:
        lines += ["", "Skipped:"] + [f"  {outcome.test_id}: {outcome.message[:200]}" for outcome in skipped]
    if requests:
        lines += ["", "Requests the fakes answered (protocol model: count):"]
        lines += [f"  {key}: {count}" for key, count in requests.items()]
    return "\n".join(lines)


def as_json(mode: str, outcomes: list[Outcome], header: dict[str, str], requests: dict[str, int],
            logged: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    return {"mode": mode, **header, "outcomes": [asdict(outcome) for outcome in outcomes], "requests": requests,
            "logged_failures": [{"test_id": test_id, "line": line} for test_id, line in logged],
            "known": {test_id: why for test_id, (modes, why) in KNOWN.items() if mode in modes}}
