"""The bundled sample: a small invented shop database and twenty questions about it.

- ``shop.sql``: the SQLite DDL and rows (customers, products, orders, order_items);
- ``questions.jsonl``: questions of increasing difficulty with their gold SQL (SQLite), a
  batch input file as ``dq batch`` reads it;
- ``answers.json``: what the demo's scripted fake model answers, question id -> ``{"sql": ...}``.
  Most answers are right (often written differently from the gold SQL, which is fine: results
  are compared, not text); q11, q16 and q17 are plausible but wrong and q09 does not parse, so
  the demo's execution accuracy is 16/20 = 80%.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

__all__ = ["build_sample_db", "sample_answers", "sample_questions_path", "sample_sql_path", "write_sample"]

_HERE = Path(__file__).resolve().parent


def sample_sql_path() -> Path:
    """The shop's DDL and rows."""
    return _HERE / "shop.sql"


def sample_questions_path() -> Path:
    """The sample batch input (JSONL)."""
    return _HERE / "questions.jsonl"


def sample_answers() -> dict[str, dict[str, Any]]:
    """The scripted model's answers: question id -> {"sql": ...}."""
    with (_HERE / "answers.json").open(encoding="utf-8") as handle:
        answers: dict[str, dict[str, Any]] = json.load(handle)
    return answers


def build_sample_db(path: str | os.PathLike[str]) -> str:
    """Create the shop database at ``path`` (replacing any file there) and return its
    SQLAlchemy URL."""
    target = Path(path).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    # built beside the target and renamed, so a reader never sees a half-built database
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    try:
        connection = sqlite3.connect(partial)
        try:
            connection.executescript(sample_sql_path().read_text(encoding="utf-8"))
            connection.commit()
        finally:
            connection.close()
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return f"sqlite:///{target}"


def write_sample(directory: str | os.PathLike[str], *, overwrite: bool = False) -> list[Path]:
    """Write the sample into ``directory``, as a user's own files would be: ``warehouse.db``
    (the shop), ``questions.jsonl`` and the same questions as ``questions.csv``. Existing files
    are kept unless ``overwrite``; returns the paths written."""
    target = Path(directory).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    names = ("warehouse.db", "questions.jsonl", "questions.csv")
    taken = [name for name in names if (target / name).exists()]
    if taken and not overwrite:
        raise FileExistsError(f"{target}: {', '.join(taken)} already there; remove them or pass --force")
    build_sample_db(target / "warehouse.db")
    shutil.copyfile(sample_questions_path(), target / "questions.jsonl")
    rows = [json.loads(line) for line in sample_questions_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    with (target / "questions.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "question", "gold_sql"])
        writer.writeheader()
        writer.writerows({key: row.get(key, "") for key in ("id", "question", "gold_sql")} for row in rows)
    return [target / name for name in names]
