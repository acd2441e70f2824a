"""The inbox and outbox in the service's own SQL database (PostgreSQL), through SQLAlchemy 2.

A service whose state lives in PostgreSQL keeps its inbox and outbox next to it, so a handler's
writes, the inbox mark and the messages it sent commit in one database transaction. The handler
writes (and reads) through ``ctx.transaction()``, a SQLAlchemy ``Session`` begun for this run;
``settle`` adds the mark and the outbox rows to that session and commits it::

    @handles(RenameAsset, service="assets")
    def rename(cmd: RenameAsset, ctx: HandlerContext) -> None:
        session = ctx.transaction()
        session.execute(update(assets).where(...).values(name=cmd.name))

Tables (``postroom_inbox``, ``postroom_outbox``) are created by the Alembic migrations in
``postroom/stores/sql_migrations`` (``SqlStore.migrate()``, ``postroom migrate``), together with the
service's own, in the store's schema.

A message costs the database three statements besides the handler's own: ``begin`` (counts the
run and reads a recorded outcome), the settle's mark with its outbox rows, and the outbox rows'
removal once dispatched (batched across handlings); plus the commit. These statements are compiled
once per store and sent straight to the driver; the inbox row a run counts in is the row its mark
updates.
"""

from __future__ import annotations

import json
import os
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
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
    any_,
    bindparam,
    case,
    column,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.schema import CreateSchema, DropSchema
from sqlalchemy.sql import ClauseElement

from postroom.errors import ConcurrentUpdate, TransientError
from postroom.instances import Instance
from postroom.outbox import Entry

#: postroom's own migrations; a service adds its own directories of revisions (``migrations=``)
MIGRATIONS = Path(__file__).parent / "sql_migrations"
VERSION_TABLE = "postroom_alembic_version"

metadata = MetaData()

#: one row per message an owner began: its runs begun and not ended (poison detection, committed
#: apart from the handling) until it is handled, then the outcome recorded
inbox = Table(
    "postroom_inbox",
    metadata,
    Column("owner", String(200), primary_key=True),
    Column("message_id", String(64), primary_key=True),
    Column("outcome", JSON, nullable=True),  # None: not handled yet
    Column("runs", Integer, nullable=False, server_default="0"),
    Column("handled_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

outbox = Table(
    "postroom_outbox",
    metadata,
    Column("owner", String(200), primary_key=True),
    Column("message_id", String(64), primary_key=True),
    Column("entry", Text, nullable=False),  # Entry.to_json()
    Column("due_at", Float, nullable=False, index=True),  # epoch seconds, as Entry.at
)

#: one row per process manager's instance (postroom.instances): its document under a version
process = Table(
    "postroom_process",
    metadata,
    Column("process", String(200), primary_key=True),
    Column("key", String(200), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("status", String(20), nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("document", Text, nullable=False),
)

_KEY = (inbox.c.owner == bindparam("o")) & (inbox.c.message_id == bindparam("m"))
_COUNT = pg_insert(inbox).values(owner=bindparam("o"), message_id=bindparam("m"), runs=1)
#: count the run unless the message was handled, and read what was recorded: one statement
_BEGIN = _COUNT.on_conflict_do_update(
    index_elements=[inbox.c.owner, inbox.c.message_id],
    set_={"runs": case((inbox.c.outcome.is_(None), inbox.c.runs + 1), else_=inbox.c.runs)},
).returning(inbox.c.outcome, inbox.c.runs)
#: a query is never deduplicated: its run counts whatever was recorded
_BEGIN_COUNTED = _COUNT.on_conflict_do_update(
    index_elements=[inbox.c.owner, inbox.c.message_id], set_={"runs": inbox.c.runs + 1}
).returning(inbox.c.outcome, inbox.c.runs)
#: a run ended without a commit: forget a message never handled, or reset a query's count
_ENDED = (
    update(inbox)
    .where(_KEY, inbox.c.outcome.is_not(None))
    .values(runs=0)
    .add_cte(delete(inbox).where(_KEY, inbox.c.outcome.is_(None)).cte("forgotten"))
)
_MARKING = pg_insert(inbox).values(
    owner=bindparam("o"), message_id=bindparam("m"), outcome=bindparam("outcome", type_=JSON)
)
#: the mark, unless a concurrent copy committed its own first (its row then has an outcome)
_MARK = _MARKING.on_conflict_do_update(
    index_elements=[inbox.c.owner, inbox.c.message_id],
    set_={"outcome": _MARKING.excluded.outcome, "runs": 0, "handled_at": func.now()},
    where=inbox.c.outcome.is_(None),
).returning(inbox.c.message_id)
_OUTBOX_INSERT = insert(outbox)
_MARKED = _MARK.cte("marked")
_ENTRIES = (
    func.unnest(
        bindparam("ids", type_=ARRAY(String)),
        bindparam("entries", type_=ARRAY(Text)),
        bindparam("dues", type_=ARRAY(Float)),
    )
    .table_valued(column("id", String), column("entry", Text), column("due", Float))
    .render_derived("entries")
)
#: the mark of one message and its outbox rows, written only if the mark was: one round trip
_MARK_AND_RECORD = (
    insert(outbox)
    .from_select(
        ["owner", "message_id", "entry", "due_at"],
        select(bindparam("o", type_=String), _ENTRIES.c.id, _ENTRIES.c.entry, _ENTRIES.c.due).where(
            exists(_MARKED.select())
        ),
    )
    .add_cte(_MARKED)
    .returning(outbox.c.message_id)
)
_DELIVERED = delete(outbox).where(
    outbox.c.owner == bindparam("o"),
    outbox.c.message_id == any_(bindparam("ids", type_=ARRAY(String))),
)
_OUTCOME = select(inbox.c.outcome).where(_KEY, inbox.c.outcome.is_not(None))


@dataclass(frozen=True)
class _Compiled:
    """One of the statements every message costs, compiled once for a store's schema and run
    on the driver's cursor: SQLAlchemy's execution path (a Connection, its cache lookup, result
    processing) cost more CPU than the statement's round trip, and a worker runs several per
    message. psycopg prepares a statement it sees repeatedly on the server, too."""

    sql: str
    defaults: dict[str, Any]

    @classmethod
    def of(cls, statement: ClauseElement, engine: Engine, schema: str) -> _Compiled:
        compiled = (
            statement.compile(
                dialect=engine.dialect,
                schema_translate_map={None: schema},
                render_schema_translate=True,
            )
            if schema
            else statement.compile(dialect=engine.dialect)
        )
        return cls(compiled.string, dict(compiled.params))

    def run(self, connection: Any, params: dict[str, Any]) -> list[Any]:
        """Rows returned (if any), on a DBAPI connection; a lost connection is transient."""
        try:
            with connection.cursor() as cursor:
                cursor.execute(self.sql, {**self.defaults, **params})
                return cursor.fetchall() if cursor.description else []
        except psycopg.OperationalError as exc:
            raise TransientError(f"the database connection was lost: {exc}") from exc


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
        # postroom's bookkeeping (a run's count, the removal of sent entries) stands alone, so
        # it needs no BEGIN and COMMIT round trips, and it does not wait for its commit to reach
        # the disk: a database that crashes loses at most its last moments, which costs the
        # poison guard one run or the sweep one repeat (dropped by the receivers), never an
        # effect. The handling itself (writes, mark, outbox) commits as the database is set to.
        bookkeeping = create_engine(engine.url, pool=engine.pool.recreate())
        event.listen(bookkeeping, "connect", _commit_asynchronously)
        self.autocommit = bookkeeping.execution_options(
            isolation_level="AUTOCOMMIT", schema_translate_map={None: schema or None}
        )
        self._bookkeeping = bookkeeping
        self._begin, self._begin_counted, self._mark_and_record, self._delivered = (
            _Compiled.of(statement, engine, schema)
            for statement in (_BEGIN, _BEGIN_COUNTED, _MARK_AND_RECORD, _DELIVERED)
        )
        _dispose_after_fork(engine)
        _dispose_after_fork(bookkeeping)

    @classmethod
    def from_url(
        cls, url: str, schema: str = "", *, migrations: Sequence[Path | str] = ()
    ) -> SqlStore:
        """A store on its own Engine. Connections are not pinged before use (a round trip per
        checkout): one lost with a restarted database fails its statement as a TransientError,
        the message is retried, and the pool replaces every connection older than the loss."""
        return cls(create_engine(url), schema=schema, migrations=migrations)

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"SqlStore({url!r}, schema={self.schema!r})"

    def migrate(self, revision: str = "heads") -> None:
        """Bring the tables (postroom's and the service's) to ``revision`` (the newest by
        default); creates the schema if needed. Idempotent, and safe to run from several
        processes at once."""
        # Alembic is imported here, not with the module: every worker and CLI process imports
        # the store, few of them migrate, and the import costs each a fifth of a second
        import alembic.command  # noqa: PLC0415
        import alembic.config  # noqa: PLC0415

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
            alembic.command.upgrade(config, revision)

    def begin(
        self, owner: str, message_id: str, *, dedupe: bool = True
    ) -> tuple[dict[str, Any] | None, int]:
        statement = self._begin if dedupe else self._begin_counted
        ((done, count),) = self._bookkeep(statement, {"o": owner, "m": message_id})
        if dedupe and done is not None:
            return dict(done), 0
        return None, int(count)

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
        *,
        instances: Sequence[Instance] = (),
    ) -> bool:
        session = self.sessions() if tx is None else tx
        try:
            with _transient():
                return self._settle(
                    session, owner, message_ids, outcome, outbox, instances=instances
                )
        finally:
            session.close()

    def _settle(
        self,
        session: Session,
        owner: str,
        message_ids: list[str],
        outcome: dict[str, Any],
        entries: Sequence[Entry],
        *,
        instances: Sequence[Instance] = (),
    ) -> bool:
        # The mark goes in before the handler's pending ORM objects are flushed: a concurrent
        # copy of the message then waits on, and loses at, the inbox row, not the handler's rows.
        # A copy that committed its mark first leaves this one's update nothing to do.
        with session.no_autoflush:
            if len(message_ids) == 1 and entries:
                recorded = self._mark_and_record.run(
                    session.connection().connection.dbapi_connection,
                    {
                        "o": owner,
                        "m": message_ids[0],
                        "outcome": json.dumps(outcome),
                        "ids": [e.message_id for e in entries],
                        "entries": [e.to_json() for e in entries],
                        "dues": [e.at for e in entries],
                    },
                )
                won = bool(recorded)
            else:
                won = self._mark(session, owner, message_ids, outcome, entries)
        if not won:
            session.rollback()
            return False
        for instance in instances:
            if not _write_instance(session, instance):
                session.rollback()
                raise ConcurrentUpdate(f"{instance.address} changed since it was loaded")
        session.commit()
        return True

    @staticmethod
    def _mark(
        session: Session,
        owner: str,
        message_ids: list[str],
        outcome: dict[str, Any],
        entries: Sequence[Entry],
    ) -> bool:
        marks = [{"o": owner, "m": m, "outcome": outcome} for m in message_ids]
        if message_ids[0] not in set(session.scalars(_MARK, marks)):
            return False
        if entries:
            rows = [
                {"owner": owner, "message_id": e.message_id, "entry": e.to_json(), "due_at": e.at}
                for e in entries
            ]
            session.execute(_OUTBOX_INSERT, rows)
        return True

    def discard(self, tx: Session | None) -> None:
        if tx is not None:
            tx.close()  # rolls back what the handler wrote

    def delivered(self, owner: str, entry_ids: list[str]) -> None:
        self._bookkeep(self._delivered, {"o": owner, "ids": entry_ids})

    def _bookkeep(self, statement: _Compiled, params: dict[str, Any]) -> list[Any]:
        """A statement of postroom's bookkeeping, committed on its own (autocommit)."""
        try:  # a raw checkout: a refused connect is the driver's error, not SQLAlchemy's
            connection = self._bookkeeping.raw_connection()
        except psycopg.OperationalError as exc:
            raise TransientError(f"the database cannot be reached: {exc}") from exc
        try:
            connection.dbapi_connection.autocommit = True  # type: ignore[union-attr]
            return statement.run(connection.dbapi_connection, params)
        except TransientError:
            connection.invalidate()
            raise
        finally:
            connection.close()

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
        with _transient(), self.autocommit.connect() as conn:
            conn.execute(_ENDED, {"o": owner, "m": message_id})

    def runs(self, owner: str, message_id: str) -> int:
        """Runs begun and not ended: a run in progress, or runs that died with their worker."""
        with self.engine.connect() as conn:
            found = conn.scalar(select(inbox.c.runs).where(_KEY), {"o": owner, "m": message_id})
            return int(found or 0)

    def outcome(self, owner: str, message_id: str) -> dict[str, Any] | None:
        with _transient(), self.autocommit.connect() as conn:
            done = conn.scalar(_OUTCOME, {"o": owner, "m": message_id})
            return None if done is None else dict(done)

    def instance(self, process_name: str, key: str) -> Instance | None:
        found = select(process.c.version, process.c.document).where(
            process.c.process == process_name, process.c.key == key
        )
        with _transient(), self.autocommit.connect() as conn:
            row = conn.execute(found).first()
        return None if row is None else Instance.load(process_name, key, row.document, row.version)

    def instances(
        self, process_name: str, *, running: bool = True, limit: int = 100
    ) -> list[Instance]:
        status = process.c.status == "running" if running else process.c.status != "running"
        found = (
            select(process.c.key, process.c.version, process.c.document)
            .where(process.c.process == process_name, status)
            .order_by(process.c.updated_at.desc())
            .limit(limit)
        )
        with _transient(), self.autocommit.connect() as conn:
            rows = conn.execute(found).all()
        return [Instance.load(process_name, r.key, r.document, r.version) for r in rows]

    def drop_schema(self) -> None:
        """Drop the store's schema and everything in it (tests' own schemas)."""
        if not self.schema:
            raise ValueError("refusing to drop the database's default schema")
        with self.engine.begin() as conn:
            conn.execute(DropSchema(self.schema, cascade=True, if_exists=True))


def _write_instance(session: Session, instance: Instance) -> bool:
    """Write the instance at its next version, if its row is still at the version it was loaded
    at (none, for a new one); False if another handling's write got there first. A concurrent
    write not committed yet makes this wait for it, then find the row changed."""
    values = {
        "version": instance.version + 1,
        "status": instance.status,
        "updated_at": instance.updated_at,
        "document": instance.document(),
    }
    written: Any
    if instance.version == 0:
        written = (
            pg_insert(process)
            .values(process=instance.process, key=instance.key, **values)
            .on_conflict_do_nothing(index_elements=[process.c.process, process.c.key])
            .returning(process.c.key)
        )
    else:
        written = (
            update(process)
            .where(
                process.c.process == instance.process,
                process.c.key == instance.key,
                process.c.version == instance.version,
            )
            .values(**values)
            .returning(process.c.key)
        )
    return session.execute(written).first() is not None


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


def _commit_asynchronously(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("SET synchronous_commit TO off")  # for the session, not just this transaction
    cursor.close()
    connection.commit()


def _dispose_after_fork(engine: Engine) -> None:
    """A forked child (a Celery pool process) must not share its parent's connections: it drops
    the inherited pool without closing the parent's sockets, as SQLAlchemy's pooling guide says."""
    ref = weakref.ref(engine)

    def dispose() -> None:
        alive = ref()
        if alive is not None:
            alive.dispose(close=False)

    os.register_at_fork(after_in_child=dispose)
