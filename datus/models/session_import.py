"""Carry sessions of the earlier store over to the current one, once, on request.

Before Datus-agent's layout was adopted, sessions lived in tables ``sessions`` and
``session_messages`` (provider-neutral `ChatMessage` JSON with a token count per message), in
``~/.datus/sessions/sessions.db`` or the database ``DQ_SESSION_URL`` named. Nothing reads them
any more; this copies each into the current store (`SessionManager`) with its messages and
token total::

    python -m datus.models.session_import                       # the default file -> the default store
    python -m datus.models.session_import --source postgresql://... --url postgresql://...

A session already holding messages in the target is left alone, so running it again is
harmless; an id the current store refuses (see `SESSION_ID_PATTERN`) is reported and skipped.
A SQLite source file is renamed to ``<name>.imported`` afterwards (the default one sits in the
sessions directory, where a ``*.db`` file would be listed as a session); the tables of any other
database are left for you to drop.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from datus.models.messages import ChatMessage
from datus.models.session_manager import SessionManager
from datus.models.session_store import is_valid_session_id
from datus.models.sql_engines import SQLiteFileNotFoundError, create_read_only_engine, with_driver

__all__ = ["DEFAULT_SOURCE", "ImportReport", "import_legacy_sessions"]

DEFAULT_SOURCE = "sqlite:///~/.datus/sessions/sessions.db"

_legacy = sa.MetaData()
_sessions = sa.Table("sessions", _legacy, sa.Column("id", sa.String), sa.Column("created_at", sa.DateTime))
_messages = sa.Table(
    "session_messages", _legacy,
    sa.Column("session_id", sa.String), sa.Column("seq", sa.Integer), sa.Column("message", sa.JSON),
    sa.Column("token_count", sa.Integer),
)


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)
    already_there: list[str] = field(default_factory=list)  # the target holds messages under this id
    invalid_ids: list[str] = field(default_factory=list)
    retired_file: Path | None = None  # the renamed SQLite source


def import_legacy_sessions(target: SessionManager, source: str = DEFAULT_SOURCE, *,
                           retire_source: bool = True) -> ImportReport:
    """Copy every session of the earlier store at ``source`` (a SQLAlchemy URL) into ``target``."""
    report = ImportReport()
    try:
        engine = create_read_only_engine(source)
    except SQLiteFileNotFoundError:
        return report  # nothing was ever stored there
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("session_messages"):
                return report
            ids = list(conn.execute(sa.select(_sessions.c.id).order_by(_sessions.c.created_at, _sessions.c.id))
                       .scalars())
            for session_id in ids:
                if not is_valid_session_id(session_id):
                    report.invalid_ids.append(session_id)
                    continue
                rows = conn.execute(sa.select(_messages.c.message, _messages.c.token_count)
                                    .where(_messages.c.session_id == session_id).order_by(_messages.c.seq)).all()
                session = target.create_session(session_id)
                if session.info().item_count:
                    report.already_there.append(session_id)
                    continue
                session.add_messages([ChatMessage.model_validate(row.message) for row in rows],
                                     [row.token_count or 0 for row in rows])
                report.imported.append(session_id)
    finally:
        engine.dispose()
    url = with_driver(source)
    if retire_source and url.get_backend_name() == "sqlite":
        path = Path(url.database or "").expanduser()
        report.retired_file = path.with_name(f"{path.name}.imported")
        path.rename(report.retired_file)
        for suffix in ("-wal", "-shm"):  # the earlier store ran in WAL mode
            companion = Path(f"{path}{suffix}")
            if companion.exists():
                companion.rename(f"{report.retired_file}{suffix}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datus.models.session_import", description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE, help=f"the earlier store (default {DEFAULT_SOURCE})")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a SQLAlchemy database to import into (default: DQ_SESSION_URL, else files)")
    where.add_argument("--sessions-dir", help="a directory of per-session files to import into")
    parser.add_argument("--keep-source", action="store_true", help="do not rename a SQLite source file")
    args = parser.parse_args(argv)
    target = SessionManager(args.url, sessions_dir=args.sessions_dir)
    try:
        report = import_legacy_sessions(target, args.source, retire_source=not args.keep_source)
    finally:
        target.close()
    print(f"imported {len(report.imported)} session(s); {len(report.already_there)} already there; "
          f"{len(report.invalid_ids)} with ids the store refuses: {', '.join(map(repr, report.invalid_ids)) or '-'}")
    if report.retired_file is not None:
        print(f"the source file is now {report.retired_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
