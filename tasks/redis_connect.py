"""``DQ_REDIS_URL`` → connections: the one place that turns the URL into Redis clients and into the
Celery/kombu/redbeat settings, so every client of the job system (broker, results, events, the
limiter, the sweep, `JobClient`, ``dq metrics``, ``dq beat``) connects the same way.

Three forms:

- ``redis://[[user]:password@]host:port/db`` — plain TCP (``unix:///path?db=N`` too).
- ``rediss://[[user]:password@]host:port/db`` — TLS, **verifying the server's certificate** by
  default: ``CERT_REQUIRED`` against the system CA bundle, host name checked. Options, in the URL's
  query or the environment (the URL wins): ``ssl_ca_certs=`` / ``DQ_REDIS_CA_CERTS`` (a private CA
  file, PEM), ``ssl_certfile=`` + ``ssl_keyfile=`` / ``DQ_REDIS_CERTFILE`` + ``DQ_REDIS_KEYFILE``
  (a client certificate, for ``tls-auth-clients yes``), ``ssl_check_hostname=false``. The opt-out
  is explicit: ``?ssl_cert_reqs=none`` (or ``optional``) in the URL, logged as a warning.
- ``sentinel://[[user]:password@]host1:26379;sentinel://host2:26379;.../db?master_name=mymaster``
  — Redis Sentinel: the sentinels (``;``-separated, kombu's form), the database and the name of
  the monitored master (required). The password is the master's (and replicas'); the sentinels'
  own, if they have one, is ``sentinel_password=``. ``ssl=true`` speaks TLS to the master and
  to the sentinels, with the same options as ``rediss://``. Every connection asks the sentinels
  where the master is when it (re)connects, so after a failover clients follow the new master.

Redis Cluster is refused (`UnsupportedRedisURL`): kombu has no Cluster transport — a worker
BRPOPs several queue keys at once and kombu moves a message between its queue and the
``unacked`` hash in one MULTI, and in a cluster those keys live on different slots (CROSSSLOT).
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

__all__ = ["RedisTarget", "UnsupportedRedisURL", "async_client", "beat_client", "celery_config", "connect",
           "parse", "where"]

logger = logging.getLogger("datus_queue.tasks.redis_connect")

_CLUSTER_SCHEMES = {"redis+cluster", "rediss+cluster", "redis-cluster", "rediss-cluster", "cluster"}
_TLS_KEYS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
_OUR_KEYS = (*_TLS_KEYS, "master_name", "sentinel_password", "ssl", "cluster")
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "cert_required": ssl.CERT_REQUIRED,
              "optional": ssl.CERT_OPTIONAL, "cert_optional": ssl.CERT_OPTIONAL,
              "none": ssl.CERT_NONE, "cert_none": ssl.CERT_NONE}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
_WARNED: set[str] = set()

UNSUPPORTED_CLUSTER = (
    "Redis Cluster is not supported by the job system: kombu (Celery's Redis broker) has no Cluster "
    "transport — a worker BRPOPs several queue keys at once and moves each message between its queue and "
    "the 'unacked' hash in one MULTI, and in a cluster those keys live on different slots. Use one Redis "
    "(with replicas and Sentinel for failover: sentinel://host:26379;sentinel://host2:26379/0?master_name=NAME)"
)


class UnsupportedRedisURL(ValueError):
    """``DQ_REDIS_URL`` names something the job system cannot use; the message says what to use."""


@dataclasses.dataclass(frozen=True)
class RedisTarget:
    """What a ``DQ_REDIS_URL`` names. ``url`` is the URL without this module's query options (for
    a direct connection); ``sentinels`` is empty unless it is a Sentinel URL."""

    url: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: dict[str, Any] | None = None  # redis-py's ssl_* keyword arguments; None: no TLS
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None
    sentinel_password: str | None = None

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)


def _bool(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise UnsupportedRedisURL(f"DQ_REDIS_URL: {name}={value!r} is not a boolean (true or false)")


def _tls_options(query: dict[str, str], settings: Any) -> dict[str, Any]:
    """redis-py's ssl_* arguments: verify by default, the URL's query over the settings."""
    reqs_text = query.get("ssl_cert_reqs", "required")
    reqs = _CERT_REQS.get(reqs_text.lower())
    if reqs is None:
        raise UnsupportedRedisURL(f"DQ_REDIS_URL: ssl_cert_reqs={reqs_text!r}: use required (the default), "
                                  "optional or none")
    options: dict[str, Any] = {"ssl_cert_reqs": reqs}
    for key, setting in (("ssl_ca_certs", "redis_ca_certs"), ("ssl_certfile", "redis_certfile"),
                         ("ssl_keyfile", "redis_keyfile")):
        value = query.get(key) or getattr(settings, setting, None)
        if value:
            options[key] = value
    check = query.get("ssl_check_hostname")
    options["ssl_check_hostname"] = reqs != ssl.CERT_NONE and (check is None or _bool("ssl_check_hostname", check))
    if reqs != ssl.CERT_REQUIRED and reqs_text not in _WARNED:  # once per process
        _WARNED.add(reqs_text)
        logger.warning("DQ_REDIS_URL: ssl_cert_reqs=%s: the Redis server's certificate is %s", reqs_text,
                       "not verified" if reqs == ssl.CERT_NONE else "verified only if it sends one")
    return options


def _without(query: list[tuple[str, str]], keys: tuple[str, ...]) -> str:
    return urlencode([(k, v) for k, v in query if k not in keys])


def parse(url: str, settings: Any = None) -> RedisTarget:
    """The target of ``url``; TLS options not in the URL come from ``settings`` (default
    `get_settings()`). Raises `UnsupportedRedisURL` for Redis Cluster and unknown schemes."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in _CLUSTER_SCHEMES:
        raise UnsupportedRedisURL(f"DQ_REDIS_URL {where(url)}: {UNSUPPORTED_CLUSTER}")
    if scheme not in ("redis", "rediss", "unix", "sentinel"):
        raise UnsupportedRedisURL(
            f"DQ_REDIS_URL {where(url)}: unknown scheme {scheme + '://' if scheme else '(none)'}; use "
            "redis://host:port/db, rediss://host:port/db (TLS) or "
            "sentinel://host:26379;sentinel://host2:26379/db?master_name=NAME")
    chunks = url.split(";")
    pairs: list[tuple[str, str]] = []
    for chunk in chunks:
        pairs += parse_qsl(urlsplit(chunk).query, keep_blank_values=True)
    query = dict(pairs)
    if "cluster" in query and _bool("cluster", query["cluster"]):
        raise UnsupportedRedisURL(f"DQ_REDIS_URL {where(url)}: {UNSUPPORTED_CLUSTER}")
    if settings is None and (scheme == "rediss" or query.get("ssl")):
        from datus_queue.tasks.settings import get_settings

        settings = get_settings()
    if scheme != "sentinel":
        if len(chunks) > 1:
            raise UnsupportedRedisURL(f"DQ_REDIS_URL {where(url)}: several URLs (';') are for sentinel:// only")
        if scheme == "redis" and any(key in query for key in _TLS_KEYS):
            raise UnsupportedRedisURL(f"DQ_REDIS_URL {where(url)}: ssl_* options need rediss:// (TLS)")
        parts = urlsplit(url)
        clean = urlunsplit(parts._replace(query=_without(parse_qsl(parts.query, keep_blank_values=True), _OUR_KEYS)))
        db_text = (query.get("db") if scheme == "unix" else parts.path.strip("/")) or "0"
        if not db_text.isdigit():
            raise UnsupportedRedisURL(f"DQ_REDIS_URL {where(url)}: the database must be a number, not {db_text!r}")
        return RedisTarget(url=clean, db=int(db_text), username=unquote(parts.username) if parts.username else None,
                           password=unquote(parts.password) if parts.password is not None else None,
                           tls=_tls_options(query, settings) if scheme == "rediss" else None)
    sentinels: list[tuple[str, int]] = []
    username = password = None
    dbs: set[str] = set()
    for chunk in chunks:
        parts = urlsplit(chunk)
        if parts.scheme.lower() != "sentinel":
            raise UnsupportedRedisURL(f"DQ_REDIS_URL {where(url)}: every ';'-separated part must be sentinel://")
        if not parts.hostname:
            raise UnsupportedRedisURL(f"DQ_REDIS_URL {where(url)}: a sentinel without a host")
        sentinels.append((parts.hostname, parts.port or 26379))
        if parts.password is not None and password is None:
            username = unquote(parts.username) if parts.username else None
            password = unquote(parts.password)
        if parts.path.strip("/"):
            dbs.add(parts.path.strip("/"))
    if len(dbs) > 1 or not all(db.isdigit() for db in dbs):
        raise UnsupportedRedisURL(f"DQ_REDIS_URL {where(url)}: one database number for all sentinels, not "
                                  f"{sorted(dbs)}")
    master_name = query.get("master_name")
    if not master_name:
        raise UnsupportedRedisURL(f"DQ_REDIS_URL {where(url)}: a sentinel URL needs ?master_name=NAME (the name "
                                  "the sentinels monitor the master under)")
    tls = _tls_options(query, settings) if query.get("ssl") and _bool("ssl", query["ssl"]) else None
    if tls is None and any(key in query for key in _TLS_KEYS):
        raise UnsupportedRedisURL(f"DQ_REDIS_URL {where(url)}: ssl_* options need ssl=true")
    return RedisTarget(url=url, db=int(dbs.pop()) if dbs else 0, username=username, password=password, tls=tls,
                       sentinels=tuple(sentinels), master_name=master_name,
                       sentinel_password=query.get("sentinel_password") or None)


def _target(source: Any) -> RedisTarget:
    if isinstance(source, RedisTarget):
        return source
    if isinstance(source, str):
        return parse(source)
    return parse(source.redis_url, source)  # Settings


def _sentinel_kwargs(target: RedisTarget, options: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
    if target.sentinel_password:
        kwargs["password"] = target.sentinel_password
    if target.tls:
        kwargs.update(ssl=True, **target.tls)
    return kwargs


def _master_kwargs(target: RedisTarget, options: dict[str, Any]) -> dict[str, Any]:
    kwargs = {"db": target.db, "username": target.username, "password": target.password, **options}
    if target.tls:
        kwargs.update(ssl=True, **target.tls)
    return kwargs


def connect(source: Any, **options: Any) -> Any:
    """A synchronous ``redis.Redis`` for ``source`` (a `Settings`, a URL or a `RedisTarget`);
    ``options`` are redis-py's (timeouts, ``decode_responses``, ...)."""
    import redis

    target = _target(source)
    if target.is_sentinel:
        from redis.sentinel import Sentinel

        manager = Sentinel(list(target.sentinels), sentinel_kwargs=_sentinel_kwargs(target, options))
        return manager.master_for(target.master_name, redis_class=redis.Redis, **_master_kwargs(target, options))
    return redis.Redis.from_url(target.url, **(target.tls or {}), **options)


def async_client(source: Any, max_connections: int | None = None, timeout: float | None = 30,
                 **options: Any) -> Any:
    """A ``redis.asyncio.Redis`` for ``source``; with ``max_connections``, its pool blocks (up to
    ``timeout`` seconds) for a free connection instead of failing."""
    import redis.asyncio as aredis

    target = _target(source)
    if target.is_sentinel:
        from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

        pool_class = SentinelConnectionPool
        if max_connections is not None:
            pool_class = _blocking_sentinel_pool()
            options = {**options, "max_connections": max_connections, "timeout": timeout}
        manager = Sentinel(list(target.sentinels), sentinel_kwargs=_sentinel_kwargs(target, options))
        return manager.master_for(target.master_name, redis_class=aredis.Redis, connection_pool_class=pool_class,
                                  **_master_kwargs(target, options))
    if max_connections is None:
        return aredis.Redis.from_url(target.url, **(target.tls or {}), **options)
    pool = aredis.BlockingConnectionPool.from_url(target.url, max_connections=max_connections, timeout=timeout,
                                                  **(target.tls or {}), **options)
    return aredis.Redis(connection_pool=pool)


_BLOCKING_SENTINEL_POOL: Any = None


def _blocking_sentinel_pool() -> Any:
    global _BLOCKING_SENTINEL_POOL
    if _BLOCKING_SENTINEL_POOL is None:
        from redis.asyncio import BlockingConnectionPool
        from redis.asyncio.sentinel import SentinelConnectionPool

        class BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
            """The master's connections, waiting for a free one past ``max_connections``."""

        _BLOCKING_SENTINEL_POOL = BlockingSentinelConnectionPool
    return _BLOCKING_SENTINEL_POOL


def _auth(target: RedisTarget) -> str:
    if target.password is None:
        return ""
    return f"{quote(target.username or '', safe='')}:{quote(target.password, safe='')}@"


def celery_config(source: Any) -> dict[str, Any]:
    """The Celery settings that make the broker (our kombu transport) and the result backend
    connect to ``source``: ``broker_url``, ``result_backend``, ``broker_transport``, TLS options
    and the Sentinel transport options (to merge into the app's transport options)."""
    target = _target(source)
    config: dict[str, Any] = {"broker_transport": "datus_queue.tasks.transport:Transport"}
    transport_options: dict[str, Any] = {}
    if target.is_sentinel:
        # kombu's and Celery's form: one sentinel:// URL per sentinel, the master's credentials and
        # the database in each, the master's name in the transport options
        urls = ";".join(f"sentinel://{_auth(target)}{host}:{port}/{target.db}" for host, port in target.sentinels)
        config.update(broker_url=urls, result_backend=urls,
                      broker_transport="datus_queue.tasks.transport:SentinelTransport")
        transport_options = {"master_name": target.master_name}
        sentinel_kwargs = _sentinel_kwargs(target, {})
        if sentinel_kwargs:
            transport_options["sentinel_kwargs"] = sentinel_kwargs
    else:
        config.update(broker_url=target.url, result_backend=target.url)
    if target.tls:
        tls = {k: v for k, v in target.tls.items()}
        config.update(broker_use_ssl=tls, redis_backend_use_ssl=tls)
    config["transport_options"] = transport_options
    return config


def beat_client(source: Any) -> Any:
    """The client dq beat (redbeat) uses: redbeat wants ``decode_responses``."""
    return connect(source, decode_responses=True)


def where(url: str) -> str:
    """Where a Redis URL points, without its password or options: ``host:port/db`` (each sentinel's,
    ``;``-separated)."""
    out = []
    for chunk in url.split(";"):
        try:
            parts = urlsplit(chunk)
            port = parts.port or (26379 if parts.scheme == "sentinel" else 6379)
            out.append(f"{parts.hostname or 'localhost'}:{port}{parts.path or ''}")
        except ValueError:
            out.append("(a URL that does not parse)")
    return ";".join(out)
