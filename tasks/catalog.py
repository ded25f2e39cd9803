"""The fleet's model catalogue: what a caller may know of the models the workers serve.

Each worker publishes every model of its agent.yml into the Redis hash `keys.model_catalog`
(the agent.yml name -> `CatalogEntry`) when it starts consuming, and again every
``DQ_SWEEP_INTERVAL_S`` from its sweep loop (`tasks.maintenance.sweep_loop`): a Redis that lost the
hash (restarted without persistence, away when the worker started) has it back within an
interval. An entry holds the provider (``type``), the provider's model id, Datus's ``vendor``, the
context window, ``max_tokens``, its own prices, and the ``base_url`` when it holds no credentials
(no user or password, no query string). Never a key: a caller holds none. Workers with the same agent.yml write the same
entries; a name another worker's agent.yml lacks is left as it is (entries do not expire: a
model dropped from every agent.yml stays listed until the hash is deleted).

A queue model (`datus.models.queue_model`) reads its entry when it is made, so its
``model_config`` carries the served model's id and provider as Datus reads them; the fleet's
agent.yml (``DQ_CONFIG``), when the caller has it, is read first.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError

from datus_queue.tasks import keys

if TYPE_CHECKING:
    from datus.models.config import AgentConfig, ModelConfig

__all__ = ["CatalogEntry", "entry_of", "publish", "read"]

logger = logging.getLogger(__name__)


class CatalogEntry(BaseModel):
    """One served model as the catalogue shows it: nothing secret."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    type: str
    model: str
    vendor: str | None = None
    context_length: int | None = None
    max_tokens: int | None = None
    base_url: str | None = None  # only one without credentials
    pricing: dict[str, Any] | None = None  # the agent.yml's own prices, if it sets them


def entry_of(config: ModelConfig) -> CatalogEntry:
    """What the catalogue shows of ``config``."""
    return CatalogEntry(type=str(config.type), model=config.model, vendor=config.vendor,
                        context_length=config.context_length, max_tokens=config.max_tokens,
                        base_url=config.base_url if _plain(config.base_url) else None,
                        pricing=config.pricing.model_dump(exclude_none=True) if config.pricing else None)


def publish(redis: Any, agent_config: AgentConfig) -> int:
    """Write every model of ``agent_config`` (queue entries aside) to the catalogue; how many."""
    entries = {name: entry_of(config).model_dump_json(exclude_none=True)
               for name, config in agent_config.models.items() if str(config.type) != "queue"}
    if entries:
        redis.hset(keys.model_catalog(), mapping=entries)
    return len(entries)


def read(redis: Any, name: str) -> CatalogEntry | None:
    """The catalogue's entry of ``name``, or None (no worker has published it)."""
    raw = redis.hget(keys.model_catalog(), name)
    if raw is None:
        return None
    try:
        return CatalogEntry.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:  # written by a newer or broken worker: as if absent
        logger.warning("the fleet's catalogue entry of model %r is unreadable: %s", name, exc)
        return None


def _plain(url: str | None) -> bool:
    """A URL that may be shown: no user, password, query or fragment (where secrets hide)."""
    if not url:
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and not (parts.username or parts.password or parts.query
                                                      or parts.fragment)
