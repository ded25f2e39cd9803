"""The job store: the source of truth for every job, batch and batch item.

    job_store.py     JobStore: jobs, batches, items (SQLite or Postgres, through SQLAlchemy)
    schema.py        the engine, the tables and their numbered migrations
    writes.py        a job's status writes, applied set-wise in one transaction
    group_commit.py  the writes of one event-loop turn share that transaction (the worker)
    rows.py          a job row as the store hands it back (StoredJob)
"""

from tasks.store.job_store import BatchInfo, BatchItem, BatchStatus, BatchSummary, JobStore
from tasks.store.rows import StoredJob
from tasks.store.schema import StoreError

__all__ = ["BatchInfo", "BatchItem", "BatchStatus", "BatchSummary", "JobStore", "StoreError", "StoredJob"]
