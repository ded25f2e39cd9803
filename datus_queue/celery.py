"""Where ``celery -A datus_queue ...`` (inspect, control, Flower) finds the app."""

from __future__ import annotations

from datus_queue.tasks.app import app

__all__ = ["app"]
