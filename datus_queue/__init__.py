"""datus-queue: the job system around the Datus model layer.

The repository keeps the job system in its top-level folders ``tasks/``, ``workers/`` and
``scheduler/``; installed, they are ``datus_queue.tasks``, ``datus_queue.workers`` and
``datus_queue.scheduler``, so they never collide with a user's own ``tasks`` module (the
Celery convention). The model layer is ``datus.models``.

``celery -A datus_queue ...`` finds the Celery app in ``datus_queue.celery``.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("datus-queue")
except metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
