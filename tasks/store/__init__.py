"""The job store: the source of truth for every job, batch and batch item.

    job_store.py      JobStore: jobs, batches, items (SQLite or Postgres, through SQLAlchemy)
    schema.py         the engine, the tables and their numbered migrations
    writes.py         a job's status writes, applied set-wise in one transaction
    group_commit.py   the writes of one event-loop turn share that transaction (the worker)
    rows.py           a job row as the store hands it back (StoredJob)
    sweeps.py         the sweeper's queries: overdue jobs, claims for a re-send or a dead letter
    dead_letters.py   dead letters: records, listing, replay
    prune.py          deleting old rows in bounded chunks
    schedule_runs.py  one row per scheduled batch slot: the claim that runs it once
"""

from datus_queue.tasks.store.dead_letters import DeadLetter
from datus_queue.tasks.store.job_store import BatchInfo, BatchItem, BatchStatus, BatchSummary, JobStore
from datus_queue.tasks.store.rows import StoredJob
from datus_queue.tasks.store.schedule_runs import ScheduleRun
from datus_queue.tasks.store.schema import StoreError
from datus_queue.tasks.store.sweeps import Resend

__all__ = ["BatchInfo", "BatchItem", "BatchStatus", "BatchSummary", "DeadLetter", "JobStore", "Resend",
           "ScheduleRun", "StoreError", "StoredJob"]
