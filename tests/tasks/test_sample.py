"""The bundled sample (tasks/batch/sample): the shop database builds, every gold query runs on it,
and the scripted answers score as the demo expects (80%)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from datus_queue.tasks.batch import scoring
from datus_queue.tasks.batch.input import Question, read_questions
from datus_queue.tasks.batch.sample import build_sample_db, sample_answers, sample_questions_path, sample_sql_path
from datus_queue.tasks.batch.scoring import execute_sql, score_item, validate_sql

# What the scripted model gets wrong, on purpose; every other answer matches.
EXPECTED_FAILURES = {"q09": "invalid_sql", "q11": "mismatch", "q16": "mismatch", "q17": "mismatch"}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield build_sample_db(tmp_path_factory.mktemp("sample") / "shop.db")
    scoring.dispose_engines()


@pytest.fixture(scope="module")
def questions() -> list[Question]:
    questions, bad = read_questions(sample_questions_path())
    assert bad == []
    return questions


def test_the_database_builds_with_a_few_dozen_rows_a_table(shop: str) -> None:
    assert shop.startswith("sqlite:///") and Path(shop.removeprefix("sqlite:///")).is_file()
    counts = {table: execute_sql(shop, f"SELECT COUNT(*) FROM {table}").rows[0][0]
              for table in ("customers", "products", "orders", "order_items")}
    assert all(10 <= count <= 50 for count in counts.values()), counts
    # the foreign keys hold
    connection = sqlite3.connect(shop.removeprefix("sqlite:///"))
    try:
        assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        connection.close()


def test_building_again_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "shop.db"
    path.parent.mkdir()
    path.write_text("not a database")
    url = build_sample_db(path)
    try:
        assert execute_sql(url, "SELECT COUNT(*) FROM products").rows[0][0] > 0
        assert sorted(p.name for p in path.parent.iterdir()) == ["shop.db"]  # nothing left beside it
    finally:
        scoring.dispose_engines()


def test_the_questions(questions: list[Question]) -> None:
    assert 18 <= len(questions) <= 25
    assert len({q.id for q in questions}) == len(questions)
    assert all(q.gold_sql for q in questions)
    assert sum(1 for q in questions if q.evidence) >= 3
    assert set(sample_answers()) == {q.id for q in questions}


def test_every_gold_query_is_valid_and_returns_rows(shop: str, questions: list[Question]) -> None:
    for question in questions:
        assert validate_sql(question.gold_sql or "", "sqlite") is None, question.id
        result = execute_sql(shop, question.gold_sql or "")
        assert result.error is None, (question.id, result.error)
        assert result.rows and not result.truncated, question.id


@pytest.mark.parametrize("form", ["fenced", "json"])
def test_the_scripted_answers_score_as_intended(shop: str, questions: list[Question], form: str) -> None:
    answers = sample_answers()
    outcomes = {}
    for question in questions:
        answer = answers[question.id]
        text = f"Here is the query:\n```sql\n{answer['sql']}\n```" if form == "fenced" else json.dumps(answer)
        result = score_item(text, question.gold_sql, shop, "sqlite", timeout_s=5)
        outcomes[question.id] = result.error_code or "match"
        if result.error_code != "invalid_sql":
            assert result.executed, (question.id, result.error)
    assert {qid: code for qid, code in outcomes.items() if code != "match"} == EXPECTED_FAILURES
    accuracy = sum(code == "match" for code in outcomes.values()) / len(outcomes)
    assert accuracy == pytest.approx(0.8)


def test_right_answers_are_not_copies_of_the_gold(questions: list[Question]) -> None:
    # results are compared, not text: the demo shows it by answering in other words
    answers = sample_answers()
    rewritten = [q.id for q in questions if answers[q.id]["sql"].strip() != (q.gold_sql or "").strip()]
    assert len(rewritten) == len(questions)


def test_the_files_ship_with_the_package() -> None:
    for path in (sample_sql_path(), sample_questions_path()):
        assert path.is_file() and path.parent.name == "sample"
    assert sample_sql_path().read_text().count("CREATE TABLE") == 4
