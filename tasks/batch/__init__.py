"""``dq batch``: files of questions turned into SQL by jobs, checked, scored and recorded.

    runner.py   BatchRunner: submit with a bound on jobs in flight, collect, score, resume
    input.py    reading JSONL and CSV questions (bad rows reported with their line number)
    scoring.py  extract, validate, execute read-only and compare SQL with the gold result
    report.py   the progress bar and the summary table
    sample/     the bundled shop database and twenty questions with gold SQL (``dq demo``)
"""
