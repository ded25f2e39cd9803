"""Which databases a tool run may open: the operator's, never the client's choice.

A `JobRequest.database` is a **name** the operator configured, or a **URL** that matches one:

- ``agent.namespace`` in agent.yml, Datus's own section (``type: sqlite`` with ``uri:``; a
  server with ``host``/``port``/``username``/``password``/``database``; or any entry with a
  full SQLAlchemy URL in ``uri:``), values with ``${VAR}``;
- ``DQ_DATABASES``, a JSON object of names to URLs (values may hold ``${VAR}``, expanded where
  the database is opened, on the worker);
- a URL the operator registered for one batch (`dq batch --db URL`: the CLI is the operator;
  `register_for_batch`), for that batch's jobs only.

A URL in a request matches a configured one when the database, host, port, user and query are
the same (the driver and the password are not compared: the request never carries a password,
the worker opens the configured URL, with its password). The job store (``DQ_DATABASE_URL``)
and the session store (``DQ_SESSION_URL``) are refused whatever the configuration says. The
check runs at submit (`JobClient.validate`) and again on the worker before the database is
opened. Errors name the field and what to configure, and show a URL without its user,
password and query.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from datus.models.config import substitute_env
from datus_queue.tasks import keys

__all__ = [
    "DatabaseNotAllowed", "configured_databases", "fingerprint", "is_url", "refuse_stores", "register_for_batch",
    "registered_for_batch", "resolve_database", "shown",
]

_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433, "oracle": 1521}
_DRIVERS = {  # Datus namespace types -> SQLAlchemy dialects
    "postgresql": "postgresql", "postgres": "postgresql", "mysql": "mysql+pymysql", "mariadb": "mysql+pymysql",
    "starrocks": "mysql+pymysql", "sqlite": "sqlite", "duckdb": "duckdb", "mssql": "mssql", "oracle": "oracle",
}
_WHERE = "agent.namespace in agent.yml or DQ_DATABASES"
REGISTRATION_TTL_S = 30 * 86_400


class DatabaseNotAllowed(ValueError):
    """The request's database is not one the operator allows (the message names the field)."""


def is_url(value: str) -> bool:
    return "://" in value


def shown(url: str | URL) -> str:
    """A URL as errors may show it: dialect, host, port and database; no user, password or query."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        return "(not a URL)"
    host = parsed.host or ""
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.drivername}://{host}{port}/{parsed.database or ''}"


# -- what the operator configured --------------------------------------------------------------


def configured_databases(agent_config: Any, settings: Any) -> dict[str, str]:
    """Names -> URLs, ``${VAR}`` expanded from this process's environment: agent.namespace,
    then DQ_DATABASES (which wins for a name in both). Raises `DatabaseNotAllowed` naming a
    variable that is not set."""
    found: dict[str, str] = {}
    sections = getattr(agent_config, "sections", None) or {}
    namespace = sections.get("namespace") if isinstance(sections, dict) else None
    if isinstance(namespace, dict):
        for name, entry in namespace.items():
            url = _namespace_url(entry)
            if url is not None:
                found[str(name)] = url
    for name, url in (getattr(settings, "databases", None) or {}).items():
        found[str(name)] = str(url)
    return found


def _namespace_url(entry: Any) -> str | None:
    """The URL of one ``agent.namespace`` entry (Datus's shape), unexpanded; None for an entry
    that names no single database (``path_pattern``, several ``dbs``)."""
    if not isinstance(entry, dict):
        return None
    uri = entry.get("uri") or entry.get("url")
    kind = str(entry.get("type") or "").lower()
    if isinstance(uri, str) and is_url(uri):
        return uri
    if kind in ("sqlite", "duckdb") and isinstance(uri, str) and uri:
        return f"{kind}:///{uri}"
    if entry.get("host") and kind in _DRIVERS:
        user = entry.get("username") or entry.get("user") or ""
        password = entry.get("password") or ""
        auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        port = f":{entry['port']}" if entry.get("port") else ""
        return f"{_DRIVERS[kind]}://{auth}{entry['host']}{port}/{entry.get('database') or ''}"
    return None


def _expand(name: str, url: str) -> str:
    missing: list[str] = []
    expanded = substitute_env(url, missing)
    if missing or not expanded:
        raise DatabaseNotAllowed(f"database: {name!r} needs environment variable(s) "
                                 f"{', '.join(dict.fromkeys(missing)) or '(its URL)'} on this process")
    return expanded


# -- comparing URLs ------------------------------------------------------------------------------


def _place(url: str | URL) -> tuple[Any, ...]:
    """Where a URL's data lives: the backend, host, port and database (a SQLite file's real path)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    backend = "mysql" if backend == "mariadb" else backend
    if backend in ("sqlite", "duckdb"):
        database = parsed.database or ""
        if database and database != ":memory:" and "mode=memory" not in str(parsed):
            database = str(Path(database).expanduser().resolve())
        return (backend, database)
    host = (parsed.host or "localhost").lower()
    host = "localhost" if host in ("127.0.0.1", "::1") else host
    return (backend, host, parsed.port or _DEFAULT_PORTS.get(backend), parsed.database or "")


def _identity(url: str | URL) -> tuple[Any, ...]:
    """A URL as compared with the allow-list: its place, user and query (not driver, not password)."""
    parsed = make_url(url)
    query = tuple(sorted((key, str(value)) for key, value in parsed.query.items()))
    return (*_place(parsed), parsed.username or "", query)


def fingerprint(url: str | URL) -> str:
    """A URL's identity, hashed (what a batch registers in Redis: no URL there)."""
    return hashlib.sha256(json.dumps(_identity(url), default=str).encode()).hexdigest()


def _stores(settings: Any) -> list[str]:
    urls = [getattr(settings, "database_url", None), os.environ.get("DQ_SESSION_URL")]
    return [url for url in urls if url]


def refuse_stores(url: str, settings: Any) -> None:
    try:
        place = _place(url)
    except (ArgumentError, ValueError):
        return
    for store in _stores(settings):
        try:
            same = _place(store) == place
        except (ArgumentError, ValueError):
            continue
        if same:
            raise DatabaseNotAllowed("database: a tool run cannot open the job system's own store "
                                     "(DQ_DATABASE_URL / DQ_SESSION_URL); name a database the operator "
                                     f"configured ({_WHERE})")


# -- the check -----------------------------------------------------------------------------------


def resolve_database(value: str, agent_config: Any, settings: Any,
                     registered: Callable[[str], bool] | Iterable[str] = ()) -> str:
    """The URL to open for a request's ``database``: a configured name's URL, the configured URL
    a given URL matches (with its password), or a URL registered for the request's batch
    (``registered``: fingerprints, or a test of one). Raises `DatabaseNotAllowed`."""
    is_registered = registered if callable(registered) else set(registered).__contains__
    configured = configured_databases(agent_config, settings)
    names = ", ".join(sorted(configured)) or "(none configured)"
    if not is_url(value):
        if value not in configured:
            raise DatabaseNotAllowed(f"database: no database of that name is configured; known: {names} "
                                     f"(the operator names databases in {_WHERE})")
        url = _expand(value, configured[value])
        refuse_stores(url, settings)
        return url
    try:
        wanted = _identity(value)
    except (ArgumentError, ValueError):
        raise DatabaseNotAllowed("database: not a SQLAlchemy URL, nor a configured name") from None
    refuse_stores(value, settings)
    for name, template in configured.items():
        try:
            url = _expand(name, template)
            if _identity(url) == wanted:
                refuse_stores(url, settings)
                return url
        except DatabaseNotAllowed:
            continue
        except (ArgumentError, ValueError):
            continue
    if is_registered(fingerprint(value)):
        return value
    raise DatabaseNotAllowed(f"database: {shown(value)} is not a database the operator allows; name one "
                             f"({names}) or have the operator add it to {_WHERE}")


# -- dq batch: the operator's own URL, for one batch ---------------------------------------------


def register_for_batch(redis: Any, batch_id: str, url: str, ttl_s: int = REGISTRATION_TTL_S) -> None:
    """Let ``batch_id``'s jobs open ``url`` (its fingerprint, in Redis, for ``ttl_s``)."""
    key = keys.batch_databases(batch_id)
    pipe = redis.pipeline()
    pipe.sadd(key, fingerprint(url))
    pipe.expire(key, ttl_s)
    pipe.execute()


async def registered_for_batch(aredis: Any, batch_id: str | None) -> set[str]:
    """The fingerprints registered for ``batch_id`` (none without one)."""
    if not batch_id:
        return set()
    members = await aredis.smembers(keys.batch_databases(batch_id))
    return {member.decode() if isinstance(member, bytes) else str(member) for member in members}


# -- on the worker -------------------------------------------------------------------------------


async def resolve_on_worker(ctx: Any, request: Any) -> str:
    """`resolve_database` for a claimed job, with its batch's registrations from Redis."""
    value = request.database
    registered = await registered_for_batch(ctx.aredis, request.batch_id) if is_url(value) else set()
    return resolve_database(value, ctx.agent_config, ctx.settings, registered)


async def database_refusal(ctx: Any, request: Any) -> str | None:
    """Why the worker will not open the job's database (None: it will, or there is none)."""
    if not getattr(request, "database", None):
        return None
    try:
        await resolve_on_worker(ctx, request)
    except DatabaseNotAllowed as exc:
        return f"{exc} (refused on the worker)"
    return None
