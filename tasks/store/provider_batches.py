"""Provider batches in the job store (``dq batch --via batch-api``).

A part is one provider batch: its row is written, with the custom_id of every item in it,
before anything is sent, and each step's result (the uploaded file, the provider's batch id,
its status and counts, the end) is written as soon as it is known. So a client that exits at
any point finds the part again on ``--resume`` and goes on from the last recorded step, and
``dq status`` / ``dq cancel`` see it from any machine.

States (`PartState`): preparing -> uploaded (OpenAI: the input file) -> creating (the create was
sent; its answer not recorded) -> submitted -> collected (every result copied into the batch's
items); or cancelled (``dq cancel``) / refused (the provider would not take it: its items are
retried).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, insert, select, update

from datus_queue.tasks.store.job_store import JobStore
from datus_queue.tasks.store.schema import provider_batch_items, provider_batches

__all__ = ["METRIC_STATES", "PartRow", "PartState", "ProviderBatchStore", "metric_state"]


class PartState(str, Enum):
    PREPARING = "preparing"
    UPLOADED = "uploaded"
    CREATING = "creating"
    SUBMITTED = "submitted"
    COLLECTED = "collected"
    CANCELLED = "cancelled"
    REFUSED = "refused"


OPEN_STATES = (PartState.PREPARING, PartState.UPLOADED, PartState.CREATING, PartState.SUBMITTED)


class PartRow(BaseModel):
    part_id: str
    batch_id: str
    provider: str
    round: int
    state: PartState
    provider_batch_id: str | None = None
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    provider_status: str | None = None
    request_counts: dict[str, Any] | None = None
    items: int
    bytes: int
    error: str | None = None
    created_at: datetime
    updated_at: datetime

    @property
    def open(self) -> bool:
        return self.state in OPEN_STATES


# what the metrics and dq status call a part: a closed set, low-cardinality
METRIC_STATES = ("preparing", "submitted", "in_progress", "done", "failed", "cancelled")
_NOT_STARTED = {None, "validating", "JOB_STATE_PENDING", "JOB_STATE_QUEUED"}  # at the provider, not yet running
_FAILED = {"failed", "expired", "JOB_STATE_FAILED", "JOB_STATE_EXPIRED"}
_CANCELLED = {"cancelled", "canceled", "cancelling", "canceling", "JOB_STATE_CANCELLED"}


def metric_state(state: PartState, provider_status: str | None) -> str:
    """A part's state as `METRIC_STATES` spells it: preparing (not at the provider yet),
    submitted (there, not started), in_progress, done, failed (refused by the provider, or
    ended failed or expired), cancelled."""
    if state in (PartState.PREPARING, PartState.UPLOADED, PartState.CREATING):
        return "preparing"
    if state is PartState.SUBMITTED:
        return "submitted" if provider_status in _NOT_STARTED else "in_progress"
    if state is PartState.REFUSED or provider_status in _FAILED:
        return "failed"
    if state is PartState.CANCELLED or provider_status in _CANCELLED:
        return "cancelled"
    return "done"


def _now() -> datetime:
    return datetime.now(UTC)


class ProviderBatchStore:
    """The provider-batch tables of ``store``'s database."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def add_part(self, part_id: str, batch_id: str, provider: str, round_: int, items: Iterable[tuple[str, str]],
                 size: int) -> None:
        """The part and its ``(custom_id, item_id)`` pairs, in one transaction, state preparing."""
        now = _now()
        rows = [{"batch_id": batch_id, "custom_id": custom_id, "item_id": item_id, "part_id": part_id,
                 "state": "pending"} for custom_id, item_id in items]
        with self.store._begin(write=True) as conn:
            conn.execute(insert(provider_batches).values(
                part_id=part_id, batch_id=batch_id, provider=provider, round=round_, state=PartState.PREPARING.value,
                items=len(rows), bytes=size, created_at=now, updated_at=now))
            conn.execute(insert(provider_batch_items), rows)

    def update_part(self, part_id: str, **values: Any) -> None:
        if isinstance(values.get("state"), PartState):
            values["state"] = values["state"].value
        with self.store._begin(write=True) as conn:
            conn.execute(update(provider_batches).where(provider_batches.c.part_id == part_id)
                         .values(**values, updated_at=_now()))

    def parts(self, batch_id: str, states: Collection[PartState] | None = None) -> list[PartRow]:
        query = select(provider_batches).where(provider_batches.c.batch_id == batch_id)
        if states is not None:
            query = query.where(provider_batches.c.state.in_([state.value for state in states]))
        with self.store._begin() as conn:
            rows = conn.execute(query.order_by(provider_batches.c.created_at, provider_batches.c.part_id)).all()
        return [PartRow.model_validate(dict(row._mapping)) for row in rows]

    def count_by_state(self) -> dict[tuple[str, str], int]:
        """Parts of every batch by ``(provider, metric_state)`` (``dq metrics``)."""
        query = select(provider_batches.c.provider, provider_batches.c.state, provider_batches.c.provider_status,
                       func.count()).group_by(provider_batches.c.provider, provider_batches.c.state,
                                              provider_batches.c.provider_status)
        with self.store._begin() as conn:
            rows = conn.execute(query).all()
        counts: dict[tuple[str, str], int] = {}
        for provider, state, provider_status, n in rows:
            key = (provider, metric_state(PartState(state), provider_status))
            counts[key] = counts.get(key, 0) + int(n)
        return counts

    def part_items(self, part_id: str) -> dict[str, str]:
        """custom_id -> item_id for one part."""
        with self.store._begin() as conn:
            rows = conn.execute(select(provider_batch_items.c.custom_id, provider_batch_items.c.item_id)
                                .where(provider_batch_items.c.part_id == part_id)).all()
        return dict(rows)  # type: ignore[arg-type]

    def set_items_state(self, batch_id: str, custom_ids: Collection[str], state: str) -> None:
        if not custom_ids:
            return
        with self.store._begin(write=True) as conn:
            conn.execute(update(provider_batch_items).where(
                provider_batch_items.c.batch_id == batch_id, provider_batch_items.c.custom_id.in_(list(custom_ids)),
            ).values(state=state))

    def rounds_by_item(self, batch_id: str) -> dict[str, int]:
        """How many provider requests each item has had (its custom_ids)."""
        with self.store._begin() as conn:
            rows = conn.execute(select(provider_batch_items.c.item_id).where(
                provider_batch_items.c.batch_id == batch_id)).scalars().all()
        counts: dict[str, int] = {}
        for item_id in rows:
            counts[item_id] = counts.get(item_id, 0) + 1
        return counts

    def items_in_open_parts(self, batch_id: str) -> set[str]:
        """Items with a request in a part that is not finished: not to be sent again."""
        open_parts = select(provider_batches.c.part_id).where(
            provider_batches.c.batch_id == batch_id,
            provider_batches.c.state.in_([state.value for state in OPEN_STATES]))
        with self.store._begin() as conn:
            return set(conn.execute(select(provider_batch_items.c.item_id).where(
                provider_batch_items.c.part_id.in_(open_parts))).scalars())
