"""The Redis transport with one change: a message body that is not a message is recorded in
the dead-letter list and skipped, instead of stopping the worker.

kombu decodes what it pops from a queue list unguarded; raw bytes pushed onto ``llm.openai``
by anything but Celery would otherwise end the worker process ("Unrecoverable error").
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from kombu.transport import redis as kombu_redis

from tasks import keys

__all__ = ["Transport"]

logger = logging.getLogger("tasks.transport")
_BAD_BODY = (ValueError, KeyError, TypeError, AttributeError)


class GuardedChannel(kombu_redis.Channel):
    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except _BAD_BODY as exc:
            self._dead_letter(exc)
            raise kombu_redis.Empty() from None

    def _get(self, queue: str) -> Any:
        try:
            return super()._get(queue)
        except _BAD_BODY as exc:
            self._dead_letter(exc, queue)
            raise kombu_redis.Empty() from None

    def _dead_letter(self, exc: BaseException, queue: str | None = None) -> None:
        raw = getattr(exc, "doc", None)  # JSONDecodeError keeps the text it failed on
        record = {"job_id": None, "reason": f"undecodable message: {type(exc).__name__}: {exc}"[:500],
                  "queue": queue, "at": datetime.now(timezone.utc).isoformat(),
                  "excerpt": raw[:200] if isinstance(raw, str) else None}
        logger.warning("dropped a message that is not a Celery message (%s); recorded in %s",
                       type(exc).__name__, keys.DEAD_LETTER)
        try:
            with self.conn_or_acquire() as client:
                client.rpush(keys.DEAD_LETTER, json.dumps(record))
        except Exception as err:  # recording must never take the consumer down
            logger.warning("could not record the dropped message: %s", err)


class Transport(kombu_redis.Transport):
    Channel = GuardedChannel
