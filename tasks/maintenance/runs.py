"""Each run of a maintenance task, counted in Redis (``dq:maintenance:<task>``: runs, last_at, last):
where an operator (``dq status``, ``dq metrics``) sees that the sweeps run and what they did."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from datus_queue.tasks import keys

__all__ = ["record_run"]

logger = logging.getLogger("datus_queue.tasks.maintenance")


def record_run(redis: Any, task: str, report: dict[str, Any]) -> dict[str, Any]:
    """Count one run of ``task`` and keep its report (cut to 10,000 characters); ``report`` back."""
    try:
        with redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(keys.maintenance(task), "runs", 1)
            pipe.hset(keys.maintenance(task), mapping={"last_at": datetime.now(UTC).isoformat(),
                                                       "last": json.dumps(report, default=str)[:10_000]})
            pipe.execute()
    except Exception as exc:  # noqa: BLE001 - the run itself is done
        logger.warning("could not record the %s run: %s", task, exc)
    return report
