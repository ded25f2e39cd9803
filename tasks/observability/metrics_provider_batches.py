"""Provider batches (``dq batch --via batch-api``) in ``dq metrics``, read from the job store at
each scrape:

    dq_provider_batches{provider,state}   provider batches by state: preparing, submitted,
                                          in_progress, done, failed, cancelled (`metric_state`)

Every state of every provider is served (0 when there is none), so a rate or an alert never
meets a missing series. One grouped query a scrape. The store being away is the fleet
collector's to report (``dq_store_up``); this one then serves nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from datus_queue.tasks.maintenance.outages import is_outage
from datus_queue.tasks.store.provider_batches import METRIC_STATES, ProviderBatchStore

__all__ = ["ProviderBatchCollector"]

PROVIDERS = ("openai", "claude", "gemini", "qwen")  # the batch APIs here (datus.models.batch_apis)


class ProviderBatchCollector(Collector):
    def __init__(self, store: Callable[[], Any]) -> None:
        """``store``: a function giving the `JobStore` (the fleet collector's, made at its first scrape)."""
        self._store = store

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            counts = ProviderBatchStore(self._store()).count_by_state()
        except Exception as exc:
            if not is_outage(exc):
                raise
            return
        gauge = GaugeMetricFamily("dq_provider_batches", "Provider batches (dq batch --via batch-api) by state",
                                  labels=["provider", "state"])
        for provider in sorted(set(PROVIDERS) | {provider for provider, _ in counts}):
            for state in METRIC_STATES:
                gauge.add_metric([provider, state], counts.get((provider, state), 0))
        yield gauge
