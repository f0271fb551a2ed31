"""The default store: one SQLite file in WAL mode, used from asyncio.

Reads run on the event loop's own connection (point reads) or a pool of reader threads.
Writes go to the writer process (:mod:`.sqlite_writer`, :mod:`.writer_process`) with group
commit: writes that arrive while earlier ones are being committed join the next
transaction, up to ``sqlite.max_batch`` each, with up to ``sqlite.batches_in_flight``
batches sent ahead; each caller is answered only after its own transaction committed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search import sqlite as sqlite_index
from twin_service.errors import StoreFull, StoreMissing, Unavailable
from twin_service.settings import SqliteSettings, StreamSettings
from twin_service.store.base import IndexTask, StoredEvent, Write, latest_lifetime, unconfirmed
from twin_service.store.own_files import create_private
from twin_service.store.restore import CREATED_FROM_SQL
from twin_service.store.sqlite_file_check import check_writable
from twin_service.store.sqlite_writer import (
    INCARNATION_SQL,
    LAST_SEQ_SQL,
    WriterConfig,
    connect,
    wire_write,
)
from twin_service.store.writer_process import WriterGone, WriterProcess
from twin_service.tasks import stop_task
from twin_service.twin.document import ChangeEvent, Tombstone, Twin
from twin_service.types import JSONObject

if TYPE_CHECKING:
    from search.rql.query import SearchQuery

log = logging.getLogger(__name__)

#: How often the store asks whether its writer process exited unnoticed.
_WRITER_CHECK_SECONDS = 1.0


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
        gc_thresholds: tuple[int, int, int] | None = None,
        existing: bool = False,
        must_exist: bool = False,
    ) -> None:
        """``existing``, ``must_exist``: see ``api.app.build_store``."""
        self._path = path
        self._must_exist = existing or must_exist
        self._builtin_index = builtin_index
        self._settings = settings
        self._writer = WriterProcess(
            WriterConfig(
                path,
                settings,
                stream,
                outbox,
                builtin_index,
                log.getEffectiveLevel(),
                gc_thresholds,
                keep_search_records=existing,
                announce_restore=not must_exist,
            )
        )
        self._in_flight = asyncio.Semaphore(settings.batches_in_flight)
        self._writes_in_flight = 0  # in batches sent to the writer, not answered yet
        self._restarting = asyncio.Lock()
        self._readers = ThreadPoolExecutor(
            max_workers=settings.read_threads, thread_name_prefix="sqlite-reader"
        )
        self._local = threading.local()
        self._loop_conn: sqlite3.Connection | None = None
        self._pending: list[_Pending] = []
        self._flushing = False
        self._flush_task: asyncio.Task[None] | None = None
        self._all_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        # Twins decoded by earlier reads or committed by this process, for point reads. Only
        # the event loop's thread touches it. Every read still asks the database whether the
        # twin is at the same revision of the same incarnation (another process may have
        # written), so it saves the decoding, never the check.
        self._cache: OrderedDict[str, tuple[Twin, int | None]] = OrderedDict()
        self._checkpointer: threading.Thread | None = None
        self._stopping = threading.Event()
        self._watcher: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        if self._must_exist and not self._path.is_file():
            raise StoreMissing(f"there is no twin store at {self._path}")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            # Before the database file is made: a refused start leaves no empty one behind.
            # The writer process checks again (check_database_file): a writer restarted
            # after a crash meets the files as they are then, not as they were at start.
            check_writable(self._path)
            create_private(self._path)
            await loop.run_in_executor(None, self._writer.start)
        except (sqlite3.Error, WriterGone, OSError) as exc:
            # Not a database, a damaged one, a directory in its place, a full disk...
            raise Unavailable(f"The twin store cannot open {self._path}: {exc}") from exc
        self._writer.listen(loop)
        (page_size,) = await self._read(
            lambda: self._reader().execute("PRAGMA page_size").fetchone()
        )
        if page_size != self._settings.page_size:
            log.info(
                "%s keeps its page size of %d bytes (sqlite.page_size %d applies to new databases)",
                self._path.name,
                page_size,
                self._settings.page_size,
            )
        if self._settings.checkpoint_interval_ms > 0:
            self._stopping.clear()
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, name="sqlite-checkpointer", daemon=True
            )
            self._checkpointer.start()
        self._watcher = loop.create_task(self._watch_writer(), name="sqlite-writer-watch")

    async def _watch_writer(self) -> None:
        """Now and then, ask whether the writer exited without the loop noticing (see
        :meth:`WriterProcess.check`): one cheap ``waitpid`` a second."""
        while True:
            await asyncio.sleep(_WRITER_CHECK_SECONDS)
            try:
                self._writer.check()
            except Exception:  # a bug here must not end the watch
                log.exception("checking the SQLite writer process failed")

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
        conn = connect(self._path, self._settings)
        with self._conns_lock:
            self._all_conns.append(conn)
        return conn

    async def close(self) -> None:
        while self._pending or self._flushing or self._writes_in_flight:
            await asyncio.sleep(0.01)
        await stop_task(self._watcher)
        self._watcher = None
        await asyncio.get_running_loop().run_in_executor(None, self._writer.stop)
        if self._checkpointer is not None:
            self._stopping.set()
            await asyncio.get_running_loop().run_in_executor(None, self._checkpointer.join)
            self._checkpointer = None
        self._readers.shutdown(wait=True)
        with self._conns_lock:
            for conn in self._all_conns:
                conn.close()
            self._all_conns.clear()

    def describe(self) -> dict[str, Any]:
        # A writer that is not running is started again by the next write.
        writer = {
            "running": self._writer.alive,
            "pid": self._writer.pid,
            "unsent": self._writer.unsent,
        }
        return {"kind": "sqlite", "file": self._path.name, "writer": writer}

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

    def _loop_connection(self) -> sqlite3.Connection:
        conn = self._loop_conn
        if conn is None:
            conn = self._loop_conn = self._connect()
            conn.execute("PRAGMA query_only = 1")
        return conn

    async def get(self, twin_id: str) -> Twin | None:
        # A primary-key lookup on a WAL database takes a few microseconds and never waits
        # for writers, while a hop to a reader thread costs tens; so this one read runs on the
        # event loop's own connection. Anything that scans (search, journal) uses the pool.
        conn = self._loop_connection()
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
                    f"SELECT CASE WHEN revision = ? AND {INCARNATION_SQL} = ? "
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

    async def tombstone(self, twin_id: str) -> Tombstone | None:
        # Read for creations (and the history of an id with no twin); the same primary-key
        # lookup as get, on the same connection.
        conn = self._loop_connection()
        try:
            row = conn.execute(
                "SELECT revision, desired_version, reported_version FROM tombstones "
                "WHERE twin_id = ?",
                (twin_id,),
            ).fetchone()
        except sqlite3.Error as exc:
            raise Unavailable(f"The twin store failed to read: {exc}") from exc
        return Tombstone(*row) if row else None

    async def created_from(self, twin_id: str) -> Tombstone | None:
        conn = self._loop_connection()
        try:
            row = conn.execute(CREATED_FROM_SQL, (twin_id,)).fetchone()
        except sqlite3.Error as exc:
            raise Unavailable(f"The twin store failed to read: {exc}") from exc
        return None if row[0] is None else Tombstone(*row)

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

    @property
    def commits_in_order(self) -> bool:
        return True  # the writer numbers events in the transaction that commits them

    @property
    def searchable(self) -> bool:
        return self._builtin_index

    @property
    def restored(self) -> bool:
        return self._writer.restored

    def _require_index(self) -> None:
        if not self._builtin_index:
            raise Unavailable(
                "The built-in search index is off (search is off or external).",
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
            # The page and the documents from the same snapshot.
            with _snapshot(conn):
                ids, cursor = sqlite_index.search_ids(conn, query)
                return self._get_many(ids), cursor

        result: tuple[list[Twin], str | None] = await self._read(run)
        return result

    async def count(self, query: SearchQuery) -> int:
        self._require_index()
        result: int = await self._read(
            lambda: sqlite_index.count(self._reader(), query.filter, query.namespaces)
        )
        return result

    async def events_after(
        self, seq: int, limit: int, *, containing: str | None = None
    ) -> list[StoredEvent]:
        def run() -> list[StoredEvent]:
            rows = self._reader().execute(
                "SELECT seq, event, state FROM events WHERE seq > ? "
                "AND (? IS NULL OR instr(state, ?) > 0) ORDER BY seq LIMIT ?",
                (seq, containing, containing, limit),
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

    async def history(
        self, twin_id: str, since: int, until: int | None, limit: int | None = None
    ) -> list[StoredEvent]:
        def run() -> list[StoredEvent]:
            rows = self._reader().execute(
                "SELECT seq, event FROM events WHERE twin_id = ? AND revision >= ? "
                "AND revision <= ? AND seq >= (SELECT IFNULL(MAX(seq), 0) FROM events "
                "WHERE twin_id = ? AND revision = 1) ORDER BY seq LIMIT ?",
                # LIMIT -1: no limit
                (twin_id, since, 2**62 if until is None else until, twin_id, limit or -1),
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

    async def privates_at(self, twin_id: str, revisions: Sequence[int]) -> dict[int, JSONObject]:
        def run() -> dict[int, JSONObject]:
            wanted = sorted(set(revisions))
            rows = self._reader().execute(
                "SELECT revision, json_extract(state, '$._private') FROM events "
                f"WHERE twin_id = ? AND revision IN ({','.join('?' * len(wanted))}) ORDER BY seq",
                (twin_id, *wanted),
            )
            return latest_lifetime((r, None if p is None else json.loads(p)) for r, p in rows)

        result: dict[int, JSONObject] = await self._read(run)
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
        row = await self._read(lambda: self._reader().execute(LAST_SEQ_SQL).fetchone())
        return int(row[0])

    async def pending_index(self, limit: int) -> list[IndexTask]:
        def run() -> list[IndexTask]:
            conn = self._reader()
            with _snapshot(conn):
                rows = conn.execute(
                    "SELECT o.twin_id, o.seq, t.doc FROM index_outbox o "
                    "LEFT JOIN twins t ON t.twin_id = o.twin_id ORDER BY o.first_seq LIMIT ?",
                    (limit,),
                ).fetchall()
            return [
                IndexTask(tid, seq, Twin.from_storage(json.loads(doc)) if doc else None)
                for tid, seq, doc in rows
            ]

        result: list[IndexTask] = await self._read(run)
        return result

    async def mark_indexed(self, tasks: list[IndexTask]) -> None:
        await self._request("mark_indexed", [(t.twin_id, t.seq) for t in tasks])

    async def _request(self, kind: str, payload: Any) -> Any:
        if not self._writer.alive:
            await self._restart_writer()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def answered(outcome: str, result: Any) -> None:
            if future.done():
                return
            if outcome == "ok":
                future.set_result(result)
            else:
                future.set_exception(_unavailable(result))

        self._writer.request(kind, payload, answered)
        return await future

    async def index_backlog(self) -> tuple[int, int | None]:
        row = await self._read(
            lambda: (
                self._reader()
                .execute("SELECT COUNT(*), MIN(first_seq) FROM index_outbox")
                .fetchone()
            )
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
        try:
            while self._pending:
                # At most ``batches_in_flight`` batches are sent ahead: the writer never
                # waits for a batch, and the rest keep joining the next one.
                await self._in_flight.acquire()
                # Each batch takes its share of all writes not yet answered: with 32
                # clients and 2 batches in flight, 16 each, so one fills while the other
                # commits (one batch of 32 made the loop and the writer take turns); with
                # hundreds waiting (MQTT ingest), up to ``max_batch``, fewer commits.
                unanswered = len(self._pending) + self._writes_in_flight
                share = -(-unanswered // self._settings.batches_in_flight)
                batch = self._pending[: max(1, min(self._settings.max_batch, share))]
                del self._pending[: len(batch)]
                self._writes_in_flight += len(batch)
                settle = functools.partial(self._settle, batch)
                if not self._writer.alive:
                    try:
                        await self._restart_writer()
                    except Unavailable as exc:
                        settle("error", exc)
                        continue
                try:
                    self._writer.request("commit", [wire_write(p.write) for p in batch], settle)
                except Exception as exc:  # e.g. a write that cannot be pickled: a bug
                    log.exception("could not send %d writes to the SQLite writer", len(batch))
                    settle("error", exc.with_traceback(None))
        finally:
            self._flushing = False

    def _settle(self, batch: list[_Pending], outcome: str, result: Any) -> None:
        self._writes_in_flight -= len(batch)
        self._in_flight.release()
        outcomes: list[int | BaseException] = (
            result if outcome == "ok" else [_unsettled(result)] * len(batch)
        )
        for pending, done in zip(batch, outcomes, strict=True):
            if not isinstance(done, BaseException):
                self._remember(pending.write.twin_id, pending.write.twin)
            if pending.future.done():
                continue
            if isinstance(done, BaseException):
                pending.future.set_exception(done)
            else:
                pending.future.set_result(done)

    async def _restart_writer(self) -> None:
        async with self._restarting:
            if self._writer.alive:  # another caller restarted it meanwhile
                return
            log.warning("starting the SQLite writer process again")
            try:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, self._writer.start)
            except Exception as exc:
                raise Unavailable(f"The SQLite writer could not start: {exc}") from exc
            self._writer.listen(loop)


@contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction: every read in the block sees the same committed state."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def _unsettled(error: BaseException) -> BaseException:
    """What the writes of a batch get when it failed: a writer that exited before answering
    may have committed them first."""
    if isinstance(error, WriterGone):
        return unconfirmed("The SQLite writer process exited before it confirmed this write")
    return _unavailable(error)


def _unavailable(error: BaseException) -> BaseException:
    """What a caller gets for a failed request: no room for it is a 507, the database or
    the writer process failing a 503; anything else (a refusal, a bug) is passed on as it
    is."""
    if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return StoreFull(
            f"The twin store has no room for this write ({error}); nothing was written.",
            description="Free space on the data directory's disk, or raise "
            "sqlite.max_database_mib.",
        )
    if isinstance(error, (sqlite3.Error, WriterGone, OSError)):
        return Unavailable(f"The twin store failed to commit: {error}")
    return error
