"""The inbox and outbox in the service's own SQL database (PostgreSQL), through SQLAlchemy 2.

A service whose state lives in PostgreSQL keeps its inbox and outbox next to it, so a handler's
writes, the inbox mark and the messages it sent commit in one database transaction. The handler
writes (and reads) through ``ctx.transaction()``, a SQLAlchemy ``Session`` begun for this run;
``settle`` adds the mark and the outbox rows to that session and commits it::

    @handles(RenameAsset, service="assets")
    def rename(cmd: RenameAsset, ctx: HandlerContext) -> None:
        session = ctx.transaction()
        session.execute(update(assets).where(...).values(name=cmd.name))

Tables (``postroom_inbox``, ``postroom_runs``, ``postroom_outbox``) are created by the Alembic
migrations in ``postroom/stores/sql_migrations`` (``SqlStore.migrate()``, ``postroom migrate``),
together with the service's own, in the store's schema.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import alembic.command
import alembic.config
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.schema import CreateSchema, DropSchema

from postroom.errors import TransientError
from postroom.outbox import Entry

#: postroom's own migrations; a service adds its own directories of revisions (``migrations=``)
MIGRATIONS = Path(__file__).parent / "sql_migrations"
VERSION_TABLE = "postroom_alembic_version"

metadata = MetaData()

inbox = Table(
    "postroom_inbox",
    metadata,
    Column("owner", String(200), primary_key=True),
    Column("message_id", String(64), primary_key=True),
    Column("outcome", JSON, nullable=False),
    Column("handled_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

#: runs begun and not ended, per message: poison detection, committed apart from the handling
runs = Table(
    "postroom_runs",
    metadata,
    Column("owner", String(200), primary_key=True),
    Column("message_id", String(64), primary_key=True),
    Column("runs", Integer, nullable=False),
)

outbox = Table(
    "postroom_outbox",
    metadata,
    Column("owner", String(200), primary_key=True),
    Column("message_id", String(64), primary_key=True),
    Column("entry", Text, nullable=False),  # Entry.to_json()
    Column("due_at", Float, nullable=False, index=True),  # epoch seconds, as Entry.at
)


class SqlStore:
    """An InboxStore on a SQLAlchemy Engine; its tables in ``schema`` (default: the database's)."""

    def __init__(
        self, engine: Engine, *, schema: str = "", migrations: Sequence[Path | str] = ()
    ) -> None:
        self.schema = schema
        self.migrations = [Path(m) for m in migrations]
        # every table without a schema of its own (postroom's and the service's) goes to ``schema``
        self.engine = engine.execution_options(schema_translate_map={None: schema or None})
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        _dispose_after_fork(engine)

    @classmethod
    def from_url(
        cls, url: str, schema: str = "", *, migrations: Sequence[Path | str] = ()
    ) -> SqlStore:
        """A store on its own Engine (connections checked before use, so a restarted database
        costs no failed message)."""
        return cls(create_engine(url, pool_pre_ping=True), schema=schema, migrations=migrations)

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"SqlStore({url!r}, schema={self.schema!r})"

    def migrate(self) -> None:
        """Bring the tables (postroom's and the service's) to the newest revision; creates the
        schema if needed. Idempotent, and safe to run from several processes at once."""
        config = alembic.config.Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.set_main_option("path_separator", "os")
        locations = [MIGRATIONS / "versions", *self.migrations]
        config.set_main_option("version_locations", os.pathsep.join(map(str, locations)))
        with self.engine.begin() as conn:
            # one migration at a time per schema: workers of several hosts may start together
            conn.execute(
                select(func.pg_advisory_xact_lock(func.hashtext(f"postroom:{self.schema}")))
            )
            if self.schema:
                conn.execute(CreateSchema(self.schema, if_not_exists=True))
            config.attributes.update(connection=conn, schema=self.schema or None)
            alembic.command.upgrade(config, "heads")

    def begin(
        self, owner: str, message_id: str, *, dedupe: bool = True
    ) -> tuple[dict[str, Any] | None, int]:
        key = {"owner": owner, "message_id": message_id}
        with _transient(), self.engine.begin() as conn:
            if dedupe:
                done = conn.scalar(select(inbox.c.outcome).filter_by(**key))
                if done is not None:
                    return dict(done), 0
            counted = (
                pg_insert(runs)
                .values(**key, runs=1)
                .on_conflict_do_update(
                    index_elements=[runs.c.owner, runs.c.message_id],
                    set_={"runs": runs.c.runs + 1},
                )
                .returning(runs.c.runs)
            )
            return None, int(conn.execute(counted).scalar_one())

    def transaction(self) -> Session:
        """A Session begun for one run; the handler writes and reads through it, ``settle``
        commits it (or ``discard`` rolls it back). Never commit it yourself."""
        session = self.sessions()
        session.begin()
        return session

    def settle(
        self,
        tx: Session | None,
        owner: str,
        message_ids: list[str],
        outcome: dict[str, Any],
        outbox: Sequence[Entry] = (),
    ) -> bool:
        session = self.sessions() if tx is None else tx
        try:
            with _transient():
                return self._settle(session, owner, message_ids, outcome, outbox)
        finally:
            session.close()

    def _settle(
        self,
        session: Session,
        owner: str,
        message_ids: list[str],
        outcome: dict[str, Any],
        entries: Sequence[Entry],
    ) -> bool:
        # The inbox rows go in before the handler's pending ORM objects are flushed: a concurrent
        # copy of the message then waits on, and loses at, the inbox row, not the handler's rows.
        with session.no_autoflush:
            if self._marked(session, owner, message_ids[0]):
                session.rollback()
                return False
            try:
                session.execute(
                    insert(inbox),
                    [{"owner": owner, "message_id": m, "outcome": outcome} for m in message_ids],
                )
            except IntegrityError:  # a concurrent copy committed its mark first
                session.rollback()
                if self.outcome(owner, message_ids[0]) is None:
                    raise
                return False
        if entries:
            session.execute(
                insert(outbox),
                [
                    {
                        "owner": owner,
                        "message_id": e.message_id,
                        "entry": e.to_json(),
                        "due_at": e.at,
                    }
                    for e in entries
                ],
            )
        session.execute(
            delete(runs).where(runs.c.owner == owner, runs.c.message_id.in_(message_ids))
        )
        session.commit()
        return True

    @staticmethod
    def _marked(session: Session, owner: str, message_id: str) -> bool:
        found = session.scalar(
            select(inbox.c.message_id).filter_by(owner=owner, message_id=message_id)
        )
        return found is not None

    def discard(self, tx: Session | None) -> None:
        if tx is not None:
            tx.close()  # rolls back what the handler wrote

    def delivered(self, owner: str, entry_ids: list[str]) -> None:
        with _transient(), self.engine.begin() as conn:
            conn.execute(
                delete(outbox).where(outbox.c.owner == owner, outbox.c.message_id.in_(entry_ids))
            )

    def claim_stale(self, grace: float, limit: int) -> list[tuple[str, Entry]]:
        now = time.time()
        due = (
            select(outbox.c.owner, outbox.c.message_id, outbox.c.entry)
            .where(outbox.c.due_at <= now - grace)
            .order_by(outbox.c.due_at)
            .limit(limit)
            .with_for_update(skip_locked=True)  # a concurrent sweep takes the others
        )
        with _transient(), self.engine.begin() as conn:
            rows = conn.execute(due).all()
            if rows:
                keys = tuple_(outbox.c.owner, outbox.c.message_id)
                conn.execute(
                    update(outbox)
                    .where(keys.in_([(r.owner, r.message_id) for r in rows]))
                    .values(due_at=now)
                )
        return [(row.owner, Entry.from_json(row.entry)) for row in rows]

    def pending(self) -> int:
        """Outbox entries not dispatched yet, of every owner."""
        with self.engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(outbox)) or 0)

    def ended(self, owner: str, message_id: str) -> None:
        with _transient(), self.engine.begin() as conn:
            conn.execute(delete(runs).filter_by(owner=owner, message_id=message_id))

    def runs(self, owner: str, message_id: str) -> int:
        """Runs begun and not ended: a run in progress, or runs that died with their worker."""
        with self.engine.connect() as conn:
            found = conn.scalar(select(runs.c.runs).filter_by(owner=owner, message_id=message_id))
            return int(found or 0)

    def outcome(self, owner: str, message_id: str) -> dict[str, Any] | None:
        with _transient(), self.engine.connect() as conn:
            done = conn.scalar(
                select(inbox.c.outcome).filter_by(owner=owner, message_id=message_id)
            )
            return None if done is None else dict(done)

    def drop_schema(self) -> None:
        """Drop the store's schema and everything in it (tests' own schemas)."""
        if not self.schema:
            raise ValueError("refusing to drop the database's default schema")
        with self.engine.begin() as conn:
            conn.execute(DropSchema(self.schema, cascade=True, if_exists=True))


@contextmanager
def _transient() -> Iterator[None]:
    """A connection lost mid-statement (the database restarted, a proxy dropped it) is worth
    another attempt, whatever class the driver reported it as. Its OperationalError already is
    (postroom.retries)."""
    try:
        yield
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise TransientError(f"the database connection was lost: {exc}") from exc
        raise


def _dispose_after_fork(engine: Engine) -> None:
    """A forked child (a Celery pool process) must not share its parent's connections: it drops
    the inherited pool without closing the parent's sockets, as SQLAlchemy's pooling guide says."""
    ref = weakref.ref(engine)

    def dispose() -> None:
        alive = ref()
        if alive is not None:
            alive.dispose(close=False)

    os.register_at_fork(after_in_child=dispose)
