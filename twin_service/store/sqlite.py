"""The default store: one SQLite file in WAL mode, used from asyncio through threads.

Writes go through one writer thread with group commit: every write that arrives while a
commit is running joins the next transaction, and each caller is answered only after its
own transaction committed. Each write is a compare-and-set on the revision inside
``BEGIN IMMEDIATE``, so several processes sharing the file never lose an update. The built-in
search index (:mod:`search.sqlite_index`) is updated in the same transaction as the twin.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search import sqlite as sqlite_index
from twin_service.errors import Unavailable
from twin_service.settings import SqliteSettings, StreamSettings
from twin_service.store.base import IndexTask, RevisionConflict, StoredEvent, Write
from twin_service.twin.document import ChangeEvent, Twin
from twin_service.twin.jsonvalue import dumps

if TYPE_CHECKING:
    from search.rql.query import SearchQuery

log = logging.getLogger(__name__)

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS twins (
        twin_id TEXT PRIMARY KEY,
        namespace TEXT NOT NULL,
        revision INTEGER NOT NULL,
        doc TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        twin_id TEXT NOT NULL,
        revision INTEGER NOT NULL,
        ts TEXT NOT NULL,
        event TEXT NOT NULL,
        state TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS events_by_twin ON events (twin_id, revision)",
    "CREATE INDEX IF NOT EXISTS events_by_twin_seq ON events (twin_id, seq)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS events_by_ts ON events (ts)",
    # Outbox of the external search index: one row per twin whose latest write (seq) the
    # index has not acknowledged, written in the same transaction as the twin.
    """CREATE TABLE IF NOT EXISTS index_outbox (
        twin_id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS index_outbox_by_seq ON index_outbox (seq)",
]


#: The stored twin's incarnation, as :attr:`Twin.incarnation` computes it.
_INCARNATION_SQL = (
    "COALESCE(json_extract(doc, '$._private.incarnation'), json_extract(doc, '$.created'))"
)
#: The newest event older than the age limit. ``INDEXED BY``: left to itself, SQLite answers
#: ``MAX(seq)`` by walking the table backwards from the newest event until one is old
#: enough, which reads the whole journal when none is (230 ms at 190,000 events, in the
#: writer, every 100 commits: the PATCH p99 at 100,000 twins).
LATEST_EXPIRED_SQL = "SELECT MAX(seq) FROM events INDEXED BY events_by_ts WHERE ts < ?"


@dataclass
class _Pending:
    write: Write
    future: asyncio.Future[int]


class SqliteStore:
    """:class:`twin_service.store.base.TwinStore` on SQLite."""

    def __init__(
        self,
        path: Path,
        settings: SqliteSettings,
        stream: StreamSettings,
        *,
        outbox: bool = False,
        builtin_index: bool = True,
    ) -> None:
        self._path = path
        self._outbox = outbox
        self._builtin_index = builtin_index
        self._settings = settings
        self._stream = stream
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._readers = ThreadPoolExecutor(
            max_workers=settings.read_threads, thread_name_prefix="sqlite-reader"
        )
        self._local = threading.local()
        self._write_conn: sqlite3.Connection | None = None
        self._loop_conn: sqlite3.Connection | None = None
        self._pending: list[_Pending] = []
        self._flushing = False
        self._flush_task: asyncio.Task[None] | None = None
        self._batches = 0
        self._all_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        # Twins decoded by earlier reads or committed by this process, for point reads. Only
        # the event loop's thread touches it. Every read still asks the database whether the
        # twin is at the same revision of the same incarnation (another process may have
        # written), so it saves the decoding, never the check.
        self._cache: OrderedDict[str, tuple[Twin, int | None]] = OrderedDict()
        self._checkpointer: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._open_writer)
        if self._settings.checkpoint_interval_ms > 0:
            self._stopping.clear()
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, name="sqlite-checkpointer", daemon=True
            )
            self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        """Copy committed WAL pages back into the database, beside the writer.

        A checkpoint run by the committing writer (SQLite's auto-checkpoint) stalls every
        write queued behind that commit while it copies thousands of pages and syncs. Run
        here, it overlaps with the writer (PASSIVE never blocks it, nor readers). The writer
        keeps ``wal_autocheckpoint`` as a backstop: when it fires after this thread has
        copied most pages, only the remainder is left, and the log restarts from the top.
        """
        conn = self._connect()
        interval = self._settings.checkpoint_interval_ms / 1000
        last = None
        while not self._stopping.wait(interval):
            try:
                (version,) = conn.execute("PRAGMA data_version").fetchone()
                if version != last:
                    last = version
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:  # e.g. the disk is full: the writer reports it
                log.warning("background checkpoint of %s failed: %s", self._path.name, exc)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self._settings.busy_timeout_ms)}")
        # Only takes effect on a new, empty database, and only before WAL mode is set.
        conn.execute(f"PRAGMA page_size = {int(self._settings.page_size)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._settings.synchronous}")
        # Index rows of random twins are scattered pages: a cache and mmap well above
        # SQLite's 2 MiB default keep hot pages in reach without a read() per page.
        conn.execute(f"PRAGMA cache_size = -{int(self._settings.cache_mib) * 1024}")
        conn.execute(f"PRAGMA mmap_size = {int(self._settings.mmap_mib) * 1024 * 1024}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {int(self._settings.wal_autocheckpoint)}")
        sqlite_index.register_functions(conn)
        with self._conns_lock:
            self._all_conns.append(conn)
        return conn

    def _open_writer(self) -> None:
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in (*_SCHEMA, *sqlite_index.SCHEMA):
                conn.execute(statement)
            self._sync_builtin_index(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        if page_size != self._settings.page_size:
            log.info(
                "%s keeps its page size of %d bytes (sqlite.page_size %d applies to new databases)",
                self._path.name,
                page_size,
                self._settings.page_size,
            )
        self._write_conn = conn

    def _sync_builtin_index(self, conn: sqlite3.Connection) -> None:
        """Record whether the built-in index is maintained; rebuild it when it was not.

        A database used with an external index (builtin off) has a stale built-in index; the
        first start with it on again re-indexes every twin, inside the opening transaction.
        """
        row = conn.execute("SELECT value FROM meta WHERE key = 'builtin_index'").fetchone()
        was_on = row is None or row[0] == 1
        if self._builtin_index and not was_on:
            log.warning("rebuilding the built-in search index of %s", self._path.name)
            conn.execute("DELETE FROM search_leaf")
            conn.execute("DELETE FROM search_twin")
            for (doc,) in conn.execute("SELECT doc FROM twins").fetchall():
                sqlite_index.index_twin(conn, Twin.from_storage(json.loads(doc)).to_document())
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('builtin_index', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (1 if self._builtin_index else 0,),
        )

    async def close(self) -> None:
        while self._pending or self._flushing:
            await asyncio.sleep(0.01)
        if self._checkpointer is not None:
            self._stopping.set()
            await asyncio.get_running_loop().run_in_executor(None, self._checkpointer.join)
            self._checkpointer = None
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._conns_lock:
            for conn in self._all_conns:
                conn.close()
            self._all_conns.clear()

    def describe(self) -> dict[str, Any]:
        return {"kind": "sqlite", "file": self._path.name}

    # -- reads -----------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only = 1")
            self._local.conn = conn
        return conn

    async def _read(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._readers, fn, *args)
        except sqlite3.Error as exc:
            raise Unavailable(f"The twin store failed to read: {exc}") from exc

    async def ping(self) -> None:
        await self._read(lambda: self._reader().execute("SELECT 1").fetchone())

    async def get(self, twin_id: str) -> Twin | None:
        # A primary-key lookup on a WAL database takes a few microseconds and never waits
        # for writers, while a hop to a reader thread costs tens; so this one read runs on the
        # event loop's own connection. Anything that scans (search, journal) uses the pool.
        conn = self._loop_conn
        if conn is None:
            conn = self._loop_conn = self._connect()
            conn.execute("PRAGMA query_only = 1")
        entry = self._cache.get(twin_id)
        cached = entry[0] if entry is not None else None
        try:
            # data_version changes whenever any other connection (this process's writer, or
            # another process) commits: while it stands still, a validated copy is current.
            (version,) = conn.execute("PRAGMA data_version").fetchone()
            if entry is not None and entry[1] == version:
                self._cache.move_to_end(twin_id)
                return cached
            if cached is None:
                row = conn.execute("SELECT doc FROM twins WHERE twin_id = ?", (twin_id,)).fetchone()
            else:
                # The document only when the cached copy is stale.
                row = conn.execute(
                    f"SELECT CASE WHEN revision = ? AND {_INCARNATION_SQL} = ? "
                    "THEN NULL ELSE doc END FROM twins WHERE twin_id = ?",
                    (cached.revision, cached.incarnation, twin_id),
                ).fetchone()
        except sqlite3.Error as exc:
            raise Unavailable(f"The twin store failed to read: {exc}") from exc
        if row is None:
            self._cache.pop(twin_id, None)
            return None
        if row[0] is None:
            assert cached is not None
            self._remember(twin_id, cached, version)
            return cached
        twin = Twin.from_storage(json.loads(row[0]))
        self._remember(twin_id, twin, version)
        return twin

    def _remember(self, twin_id: str, twin: Twin | None, version: int | None = None) -> None:
        """Cache ``twin``, checked against the database at data_version ``version`` (None:
        not checked yet, as for a twin this process just committed)."""
        if twin is None or self._settings.twin_cache == 0:
            self._cache.pop(twin_id, None)
            return
        self._cache[twin_id] = (twin, version)
        self._cache.move_to_end(twin_id)
        if len(self._cache) > self._settings.twin_cache:
            self._cache.popitem(last=False)

    async def get_many(self, twin_ids: list[str]) -> list[Twin]:
        result: list[Twin] = await self._read(self._get_many, twin_ids)
        return result

    def _get_many(self, twin_ids: list[str]) -> list[Twin]:
        conn = self._reader()
        found: dict[str, Twin] = {}
        for start in range(0, len(twin_ids), 500):
            chunk = twin_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for (doc,) in conn.execute(f"SELECT doc FROM twins WHERE twin_id IN ({marks})", chunk):
                twin = Twin.from_storage(json.loads(doc))
                found[twin.twin_id] = twin
        return [found[i] for i in twin_ids if i in found]

    def _require_index(self) -> None:
        if not self._builtin_index:
            raise Unavailable(
                "The built-in search index is off (an external index is configured).",
                code="index.unavailable",
            )

    async def scan(
        self, after_id: str | None, limit: int, *, containing: str | None = None
    ) -> list[Twin]:
        def run() -> list[Twin]:
            # The hint is checked on the raw text in SQLite: far cheaper than decoding every
            # twin in Python (a start-up scan of 100,000 twins took seconds of CPU).
            rows = self._reader().execute(
                "SELECT doc FROM twins WHERE twin_id > ? AND (? IS NULL OR instr(doc, ?) > 0) "
                "ORDER BY twin_id LIMIT ?",
                (after_id or "", containing, containing, limit),
            )
            return [Twin.from_storage(json.loads(doc)) for (doc,) in rows]

        result: list[Twin] = await self._read(run)
        return result

    async def twin_count(self) -> int:
        row = await self._read(
            lambda: self._reader().execute("SELECT COUNT(*) FROM twins").fetchone()
        )
        return int(row[0])

    async def search(self, query: SearchQuery) -> tuple[list[Twin], str | None]:
        self._require_index()

        def run() -> tuple[list[Twin], str | None]:
            conn = self._reader()
            # One read transaction so the page and the documents are the same snapshot.
            conn.execute("BEGIN")
            try:
                ids, cursor = sqlite_index.search_ids(conn, query)
                return self._get_many(ids), cursor
            finally:
                conn.execute("COMMIT")

        result: tuple[list[Twin], str | None] = await self._read(run)
        return result

    async def count(self, query: SearchQuery) -> int:
        self._require_index()
        result: int = await self._read(
            lambda: sqlite_index.count(self._reader(), query.filter, query.namespaces)
        )
        return result

    async def events_after(self, seq: int, limit: int) -> list[StoredEvent]:
        def run() -> list[StoredEvent]:
            rows = self._reader().execute(
                "SELECT seq, event, state FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            )
            return [
                StoredEvent(
                    s,
                    ChangeEvent.from_json(json.loads(e)),
                    Twin.from_storage(json.loads(st)) if st else None,
                )
                for s, e, st in rows
            ]

        result: list[StoredEvent] = await self._read(run)
        return result

    async def history(self, twin_id: str, since: int, until: int | None) -> list[StoredEvent]:
        def run() -> list[StoredEvent]:
            rows = self._reader().execute(
                "SELECT seq, event FROM events WHERE twin_id = ? AND revision >= ? "
                "AND revision <= ? ORDER BY seq",
                (twin_id, since, until if until is not None else 2**62),
            )
            return [StoredEvent(s, ChangeEvent.from_json(json.loads(e))) for s, e in rows]

        result: list[StoredEvent] = await self._read(run)
        return result

    async def twin_at(self, twin_id: str, revision: int) -> Twin | None:
        def run() -> Twin | None:
            row = (
                self._reader()
                .execute(
                    "SELECT state FROM events WHERE twin_id = ? AND revision = ? "
                    "ORDER BY seq DESC LIMIT 1",
                    (twin_id, revision),
                )
                .fetchone()
            )
            return Twin.from_storage(json.loads(row[0])) if row and row[0] else None

        result: Twin | None = await self._read(run)
        return result

    async def pruned_seq(self) -> int:
        row = await self._read(
            lambda: (
                self._reader().execute("SELECT value FROM meta WHERE key = 'pruned_seq'").fetchone()
            )
        )
        return int(row[0]) if row else 0

    async def oldest_seq(self) -> int:
        row = await self._read(
            lambda: self._reader().execute("SELECT MIN(seq) FROM events").fetchone()
        )
        return int(row[0] or 0)

    async def last_seq(self) -> int:
        row = await self._read(
            lambda: self._reader().execute("SELECT MAX(seq) FROM events").fetchone()
        )
        return int(row[0] or 0)

    async def pending_index(self, limit: int) -> list[IndexTask]:
        def run() -> list[IndexTask]:
            conn = self._reader()
            conn.execute("BEGIN")
            try:
                rows = conn.execute(
                    "SELECT o.twin_id, o.seq, t.doc FROM index_outbox o "
                    "LEFT JOIN twins t ON t.twin_id = o.twin_id ORDER BY o.seq LIMIT ?",
                    (limit,),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
            return [
                IndexTask(tid, seq, Twin.from_storage(json.loads(doc)) if doc else None)
                for tid, seq, doc in rows
            ]

        result: list[IndexTask] = await self._read(run)
        return result

    async def mark_indexed(self, tasks: list[IndexTask]) -> None:
        def run() -> None:
            conn = self._write_conn
            assert conn is not None
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "DELETE FROM index_outbox WHERE twin_id = ? AND seq = ?",
                    [(t.twin_id, t.seq) for t in tasks],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer, run)
        except sqlite3.Error as exc:
            raise Unavailable(f"The twin store failed to commit: {exc}") from exc

    async def index_backlog(self) -> tuple[int, int | None]:
        row = await self._read(
            lambda: self._reader().execute("SELECT COUNT(*), MIN(seq) FROM index_outbox").fetchone()
        )
        return int(row[0]), (int(row[1]) if row[1] is not None else None)

    # -- writes ----------------------------------------------------------------------------

    async def write(self, write: Write) -> int:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._pending.append(_Pending(write, future))
        if not self._flushing:
            self._flushing = True
            self._flush_task = loop.create_task(self._flush_loop())
        try:
            return await future
        finally:
            # A raised conflict's traceback holds this frame: without the future in it, the
            # exception is not part of a cycle (future -> exception -> frame -> future) and
            # reference counting frees it at once.
            del future

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch = self._pending[: self._settings.max_batch]
                del self._pending[: len(batch)]
                try:
                    outcomes = await loop.run_in_executor(
                        self._writer, self._commit_batch, [p.write for p in batch]
                    )
                except sqlite3.Error as exc:
                    error = Unavailable(f"The twin store failed to commit: {exc}")
                    for pending in batch:
                        if not pending.future.done():
                            pending.future.set_exception(error)
                    continue
                for pending, outcome in zip(batch, outcomes, strict=True):
                    if not isinstance(outcome, BaseException):
                        self._remember(pending.write.twin_id, pending.write.twin)
                    if pending.future.done():
                        continue
                    if isinstance(outcome, BaseException):
                        pending.future.set_exception(outcome)
                    else:
                        pending.future.set_result(outcome)
        finally:
            self._flushing = False

    def _commit_batch(self, writes: list[Write]) -> list[int | BaseException]:
        conn = self._write_conn
        assert conn is not None
        outcomes: list[int | BaseException] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for write in writes:
                conn.execute("SAVEPOINT w")
                try:
                    outcomes.append(self._apply(conn, write))
                    conn.execute("RELEASE w")
                except RevisionConflict as exc:
                    conn.execute("ROLLBACK TO w")
                    conn.execute("RELEASE w")
                    # Without its traceback: that references this frame, whose `writes`
                    # and `outcomes` hold the exception, a cycle keeping the whole batch
                    # alive until a full garbage collection.
                    outcomes.append(exc.with_traceback(None))
            self._batches += 1
            if self._batches % 100 == 1:
                self._prune_by_age(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes

    def _apply(self, conn: sqlite3.Connection, write: Write) -> int:
        row = conn.execute(
            f"SELECT revision, {_INCARNATION_SQL} FROM twins WHERE twin_id = ?",
            (write.twin_id,),
        ).fetchone()
        current = row[0] if row else 0
        if current != write.expected_revision:
            raise RevisionConflict(
                f"Twin {write.twin_id} is at revision {current}, not {write.expected_revision}."
            )
        # Revisions restart when a twin is deleted and created again: the incarnation tells
        # them apart, so a change computed from an older one cannot slip through.
        if row and write.previous is not None and row[1] != write.previous.incarnation:
            raise RevisionConflict(f"Twin {write.twin_id} was deleted and created again.")
        twin = write.twin
        state: str | None = None
        if twin is None:
            conn.execute("DELETE FROM twins WHERE twin_id = ?", (write.twin_id,))
            if self._builtin_index:
                sqlite_index.unindex_twin(conn, write.twin_id)
        else:
            state = dumps(twin.to_storage())
            conn.execute(
                "INSERT INTO twins (twin_id, namespace, revision, doc) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (twin_id) DO UPDATE SET revision = excluded.revision, "
                "doc = excluded.doc",
                (twin.twin_id, twin.namespace, twin.revision, state),
            )
            if self._builtin_index:
                previous = write.previous
                # Only a twin read at the revision being replaced describes the old rows.
                old_doc = (
                    previous.to_document()
                    if previous is not None and previous.revision == write.expected_revision
                    else None
                )
                sqlite_index.index_twin(conn, twin.to_document(), old_doc)
        event = write.event
        cursor = conn.execute(
            "INSERT INTO events (twin_id, revision, ts, event, state) VALUES (?, ?, ?, ?, ?)",
            (event.twin_id, event.revision, event.timestamp, dumps(event.to_json()), state),
        )
        keep = self._stream.journal_max_per_twin
        # Prune in chunks (every 64 revisions) so the common write pays nothing for it.
        if event.revision > keep and event.revision % 64 == 0:
            row = conn.execute(
                "SELECT seq FROM events WHERE twin_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?",
                (event.twin_id, keep),
            ).fetchone()
            if row is not None:
                conn.execute(
                    "DELETE FROM events WHERE twin_id = ? AND seq <= ?", (event.twin_id, row[0])
                )
                self._record_pruned(conn, row[0])
        seq = cursor.lastrowid
        assert seq is not None
        if self._outbox:
            conn.execute(
                "INSERT INTO index_outbox (twin_id, seq) VALUES (?, ?) "
                "ON CONFLICT (twin_id) DO UPDATE SET seq = excluded.seq",
                (write.twin_id, seq),
            )
        return seq

    def _prune_by_age(self, conn: sqlite3.Connection) -> None:
        cutoff = datetime.now(UTC) - timedelta(seconds=self._stream.journal_max_age_seconds)
        stamp = cutoff.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        row = conn.execute(LATEST_EXPIRED_SQL, (stamp,)).fetchone()
        if row and row[0] is not None:
            conn.execute("DELETE FROM events WHERE ts < ?", (stamp,))
            self._record_pruned(conn, row[0])

    @staticmethod
    def _record_pruned(conn: sqlite3.Connection, seq: int) -> None:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('pruned_seq', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
            (seq,),
        )
