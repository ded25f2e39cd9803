"""The Celery app, with the reliability settings of the architecture.

JSON only; late acks with requeue when a worker is lost; one message prefetched per slot; a
visibility timeout longer than the longest call plus the longest retry countdown, set in all
three places; results ignored (the job store holds them) and expiring; task arguments never
stored in results; a broker that is away — at start too — waited for as long as it takes.

The visibility timeout is not how a dead worker's jobs come back: its leases run out and a sweep
sends them again within seconds (`tasks.leases`, `tasks.maintenance.sweep_loop`). It only bounds
how long a message nobody acknowledges stays in kombu's ``unacked`` hash before kombu hands it out
again (the sweep deletes those of the jobs it sent again).
"""

from __future__ import annotations

from celery import Celery

from datus_queue.tasks.redis_connect import celery_config
from datus_queue.tasks.routing import route_task
from datus_queue.tasks.settings import Settings, get_settings

__all__ = ["TASK_MODULES", "app", "create_app"]

TASK_MODULES = ("datus_queue.tasks.generation", "datus_queue.tasks.tool_run", "datus_queue.tasks.maintenance.tasks")


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    visibility = settings.visibility_timeout_s
    # the URL → broker/backend settings (TLS verified by default, Sentinel, Cluster refused): tasks/redis_connect.py
    redis = celery_config(settings)
    celery = Celery("datus_queue", broker=redis["broker_url"], backend=redis["result_backend"],
                    include=list(TASK_MODULES))
    if "broker_use_ssl" in redis:
        celery.conf.update(broker_use_ssl=redis["broker_use_ssl"], redis_backend_use_ssl=redis["redis_backend_use_ssl"])
    celery.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        # messages Celery cannot take are acknowledged and dead-lettered, their bodies never logged
        worker_consumer="datus_queue.workers.consumer:Consumer",
        broker_transport=redis["broker_transport"],  # Redis (or Sentinel), surviving non-Celery bodies
        broker_transport_options={
            "visibility_timeout": visibility,
            # sweep for a dead worker's unacknowledged messages often enough that they come
            # back soon after the visibility timeout, not minutes later
            "unacked_restore_interval": max(1, min(10, visibility // 4)),
            "unacked_restore_throttle": 1,
            # a worker killed while it restores holds the restore lock until it expires (kombu's
            # default: 5 minutes, for every worker): keep that in proportion to the timeout
            "unacked_mutex_expire": max(10, min(300, visibility // 4)),
            **redis["transport_options"],  # Sentinel: the master's name, the sentinels' own options
        },
        result_backend_transport_options={"visibility_timeout": visibility, **redis["transport_options"]},
        visibility_timeout=visibility,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_deduplicate_successful_tasks=True,
        worker_soft_shutdown_timeout=2.0,
        worker_enable_soft_shutdown_on_idle=True,
        task_ignore_result=True,
        result_expires=settings.result_expires_s,
        result_extended=False,
        task_routes=(route_task,),
        task_default_queue="llm.default",
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        # a worker (or dq beat) waits for the broker as long as it is away, at start too: Celery's
        # default gives up after 100 tries (about 50 minutes) and ends the process
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        # Task events feed Flower; they cost a Redis publish per task state change on the
        # worker's consumer thread, so they are opt-in (DQ_TASK_EVENTS=1, `dq worker --events`,
        # or `celery control enable_events` from Flower's host).
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
    )
    return celery


app = create_app()
