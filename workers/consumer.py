"""Celery's consumer, for the messages it cannot take.

A message with no task name, for a task no worker knows, whose body does not decode, or that
Celery finds invalid never reaches a job task's strategy (`tasks.messages.job_strategy`).
Celery's own consumer logs such a message's body (a prompt, a URL — whatever a sender put
there), and for an unknown task calls ``mark_as_failure`` on the message's ``id`` header before
its signal, which raises when that header is missing or not a string. Here each is
dead-lettered with the reason only (`tasks.messages.reject_delivered`: keyed by the job id when
the message names a valid one, whose job then fails if it waited for this message) and
acknowledged, in one log line; the worker goes on with the next message. Set as
``worker_consumer`` (`tasks.app`); a body the transport cannot even parse as a message is
handled before it gets here (`tasks.transport`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from datus_queue.tasks.messages import reject_delivered

__all__ = ["Consumer"]

logger = logging.getLogger("datus_queue.workers.consumer")


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) and value.isprintable() else type(value).__name__
    return text[:100]


class Consumer(CeleryConsumer):
    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._drop(message, "invalid task message: not a task message")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        self._drop(message, f"unknown task {_shown(headers.get('task'))!r}: no worker runs it")

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._drop(message, f"invalid task message: {type(exc).__name__}: {exc}")

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self._drop(message, f"invalid task message: the body does not decode ({type(exc).__name__})")

    def _drop(self, message: Any, reason: str) -> None:
        reject_delivered(message, reason)  # never raises
        message.ack_log_error(logger, self.connection_errors)
