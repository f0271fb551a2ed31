"""The writing half of the SQLite store: schema, group commits, outbox acknowledgements.

:class:`SqliteWriter` owns the one write connection. The store runs it in a child process
of its own (:mod:`.writer_process`; ``python -m twin_service.store.sqlite_writer`` is that
child): SQLite's single writer is the bottleneck of every write, and there it has a core
and an interpreter lock to itself instead of taking turns with the event loop.

Each write of a batch is a compare-and-set on the revision (and the incarnation) inside
``BEGIN IMMEDIATE``, so several processes sharing the file never lose an update; the
built-in search index (:mod:`search.sqlite`) and the journal change in the same
transaction as the twin.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import select
import signal
import sqlite3
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

from search import sqlite as sqlite_index
from twin_service.collector import tune_gc
from twin_service.settings import SqliteSettings, StreamSettings
from twin_service.store.base import RevisionConflict, Write
from twin_service.store.restore import (
    CREATED_FROM_SQL,
    Restored,
    defer_announcement,
    deferred_restore,
    renumber_restored,
)
from twin_service.store.sqlite_file_check import check_database_file
from twin_service.store.sqlite_outbox import queue_every_twin
from twin_service.twin.document import document_from_storage
from twin_service.twin.jsonvalue import dumps_bytes
from twin_service.types import JSONObject

log = logging.getLogger(__name__)

SCHEMA = [
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
    # index has not acknowledged, written in the same transaction as the twin, with the
    # first write of the twin it has yet to take (first_seq, kept when the twin is written
    # again): every write below the lowest first_seq is indexed. Its index is made by
    # _migrate_outbox, after the column (databases from before it lack it).
    """CREATE TABLE IF NOT EXISTS index_outbox (
        twin_id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        first_seq INTEGER NOT NULL DEFAULT 0
    )""",
    # What each deleted twin left for the next twin of its id (Tombstone). A creation
    # removes its id's row, so a row means no twin of that id exists.
    """CREATE TABLE IF NOT EXISTS tombstones (
        twin_id TEXT PRIMARY KEY,
        revision INTEGER NOT NULL,
        desired_version INTEGER NOT NULL,
        reported_version INTEGER NOT NULL
    )""",
]

#: The highest sequence number ever handed out, which AUTOINCREMENT keeps in sqlite_sequence:
#: ``MAX(seq)`` falls below it once retention removed the newest events (a deletion past
#: the age goes whole), and a process that took the journal's end from that started its
#: streams before events their readers had been handed.
LAST_SEQ_SQL = "SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'events'"
#: The stored twin's incarnation, as :attr:`Twin.incarnation` computes it.
INCARNATION_SQL = (
    "COALESCE(json_extract(doc, '$._private.incarnation'), json_extract(doc, '$.created'))"
)
#: Twins read at a time when the built-in index is rebuilt.
REBUILD_PAGE = 500
#: The newest event older than the age limit. ``INDEXED BY``: left to itself, SQLite answers
#: ``MAX(seq)`` by walking the table backwards from the newest event until one is old
#: enough, which reads the whole journal when none is (230 ms at 190,000 events, in the
#: writer, every 100 commits: the PATCH p99 at 100,000 twins).
LATEST_EXPIRED_SQL = "SELECT MAX(seq) FROM events INDEXED BY events_by_ts WHERE ts < ?"
#: Pruning by age, of the events up to the newest one past the age (``:latest``) not yet
#: pruned by age (above ``:since``): each twin's newest event among them stays, unless it is
#: a deletion, and every event of the twin before it goes. A twin's next change is then
#: compared with the state it replaces (a change stream's ``left``, or a deletion, needs it),
#: however long the twin was idle. What goes may be younger than the age (clocks out of
#: order), but lies below ``pruned_seq``: no reader replays it. Each prune reads only the
#: events aged since the last (by ``seq``), and each twin's older ones by events_by_twin_seq.
PRUNE_AGED_SQL = [
    "DELETE FROM events WHERE seq IN (SELECT older.seq FROM "
    "(SELECT twin_id, MAX(seq) AS top FROM events WHERE seq > :since AND seq <= :latest "
    "GROUP BY twin_id) AS newest "
    "JOIN events AS older INDEXED BY events_by_twin_seq "
    "ON older.twin_id = newest.twin_id AND older.seq < newest.top)",
    "DELETE FROM events WHERE seq > :since AND seq <= :latest AND state IS NULL",
]
#: Longest time between two prunes by age. A commit prunes every 100th time; between
#: requests the writer prunes once this much (or a tenth of journal_max_age_seconds, if
#: less) has passed since the last prune, so that a service written to rarely or no longer
#: drops what has aged out too.
PRUNE_EVERY_SECONDS = 60.0


def connect(path: Path, settings: SqliteSettings) -> sqlite3.Connection:
    """A connection with the store's pragmas (every connection, reading or writing)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(settings.busy_timeout_ms)}")
    # Only takes effect on a new, empty database, and only before WAL mode is set.
    conn.execute(f"PRAGMA page_size = {int(settings.page_size)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {settings.synchronous}")
    # Index rows of random twins are scattered pages: a cache and mmap well above
    # SQLite's 2 MiB default keep hot pages in reach without a read() per page.
    conn.execute(f"PRAGMA cache_size = -{int(settings.cache_mib) * 1024}")
    conn.execute(f"PRAGMA mmap_size = {int(settings.mmap_mib) * 1024 * 1024}")
    conn.execute(f"PRAGMA wal_autocheckpoint = {int(settings.wal_autocheckpoint)}")
    sqlite_index.register_functions(conn)
    return conn


#: The new twin of a write as the writer process gets it: namespace, revision,
#: incarnation and the stored JSON, encoded by the service.
WireTwin = tuple[str, int, str, bytes]
#: Its event: revision, timestamp and the event's JSON.
WireEvent = tuple[int, str, bytes]
#: What the store sends the writer process for one :class:`Write`: twin id, expected
#: revision, the incarnation of the twin it replaces (``None``: not known), the new twin
#: (``None`` deletes) and the event. Encoded JSON instead of pickled objects: unpickling
#: the twins was a fifth of the writer's time under MQTT ingest, and it encoded them
#: again. The previous twin stays behind: the writer keeps the documents it indexed.
WireWrite = tuple[str, int, str | None, WireTwin | None, WireEvent]


def wire_write(write: Write) -> WireWrite:
    previous, twin, event = write.previous, write.twin, write.event
    return (
        write.twin_id,
        write.expected_revision,
        previous.incarnation if previous is not None else None,
        (twin.namespace, twin.revision, twin.incarnation, dumps_bytes(twin.to_storage()))
        if twin is not None
        else None,
        (event.revision, event.timestamp, dumps_bytes(event.to_json())),
    )


@dataclass(frozen=True)
class WriterConfig:
    """Everything the writer needs, sent to its process when it starts."""

    path: Path
    settings: SqliteSettings
    stream: StreamSettings
    outbox: bool
    builtin_index: bool
    log_level: int = logging.WARNING
    #: ``gc_thresholds`` of the service (None: CPython's defaults).
    gc_thresholds: tuple[int, int, int] | None = None
    #: Opened by an operator command: ``outbox`` and ``builtin_index`` are what it would
    #: write, not what the service keeps, so the records of both stay as they are.
    keep_search_records: bool = False
    #: False for an operator command that writes (``mqtt retire``): it raises the numbers of
    #: a restored database, but leaves announcing the restore to the service's first start,
    #: which alone clears what the lost database left on the broker.
    announce_restore: bool = True


class SqliteWriter:
    """The write connection and everything done on it."""

    def __init__(self, config: WriterConfig) -> None:
        self._config = config
        self._conn: sqlite3.Connection | None = None
        self._batches = 0
        #: When the journal was last pruned by age (time.monotonic); the first commit does.
        self._pruned_at = time.monotonic()
        # The document of each twin as this writer last indexed it, with the incarnation:
        # the next write of that twin diffs its index rows against it. Only a write that
        # replaces exactly that revision of that incarnation uses it (another process may
        # have written since); anything else re-reads the rows from the index.
        self._indexed: OrderedDict[str, tuple[int, str, JSONObject]] = OrderedDict()
        #: Set by :meth:`open` when the database was restored from a backup.
        self.restored: Restored | None = None

    def open(self) -> None:
        """Create the schema (idempotent) and bring the built-in index in line."""
        check_database_file(self._config.path, self._config.settings.busy_timeout_ms / 1000)
        conn = connect(self._config.path, self._config.settings)
        # Statement and savepoint journals (the pages a statement changes, as they were)
        # go to a temporary file once past 64 KiB: two pwrite(2) per page. When each
        # write ran in a savepoint, that was about 60 per PATCH; writes no longer use
        # one, so today this only keeps a large multi-row statement (a pruning DELETE)
        # off the disk. In memory it never outgrows what that statement changes.
        conn.execute("PRAGMA temp_store = MEMORY")
        # SQLite ends a commit by dropping cached pages numbered beyond the end of the
        # file. B-tree balancing swaps two pages' numbers through the lock page's (the page
        # at 1 GiB), so after a commit that split or merged pages, a database under 1 GiB
        # seems to have such pages, and SQLite walks the cache's whole hash table: one
        # memory access per cached page, 12% of this process's CPU under PATCH with a
        # 64 MiB cache (perf, with a SQLite 3.44 built with symbols; bench.ab on the
        # system's 3.40 confirms the gain). A small cache bounds the walk; pages it no
        # longer keeps are read through the memory map, or from the WAL.
        conn.execute(f"PRAGMA cache_size = -{int(self._config.settings.writer_cache_mib) * 1024}")
        if self._config.settings.max_database_mib:
            # Only this connection writes; SQLite keeps the database under the page count
            # (never below its current one) and answers SQLITE_FULL past it.
            (page_size,) = conn.execute("PRAGMA page_size").fetchone()
            limit = self._config.settings.max_database_mib * 1024 * 1024 // page_size
            conn.execute(f"PRAGMA max_page_count = {int(limit)}")
        try:
            with _immediate(conn):
                for statement in (*SCHEMA, *sqlite_index.SCHEMA):
                    conn.execute(statement)
                _migrate_outbox(conn)
                restored = None
                # Maintenance commands (keep_search_records) leave a restore to the service's
                # first start: it alone clears what the lost database left on the broker, and
                # its own search settings say what to index again.
                if not self._config.keep_search_records:
                    # Before anything else: no number may be handed out before it is raised.
                    renumbered = renumber_restored(conn, time.time(), outbox=self._config.outbox)
                    if self._config.announce_restore:
                        # Or one a command raised before this start.
                        restored = renumbered or deferred_restore(conn)
                    elif renumbered is not None:
                        defer_announcement(conn, renumbered)
                    self._sync_outbox(conn)  # first: it reads what the last start recorded
                    self._sync_builtin_index(conn, renumbered is not None)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        if restored is not None:
            self.restored = restored
            _log_restore(self._config.path, restored, self._config.outbox)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _sync_outbox(self, conn: sqlite3.Connection) -> None:
        """Record whether the external index's outbox is kept; fill it when it was not.

        While search was ``builtin`` or ``off``, writes never reached the outbox, so the
        first start with ``elasticsearch`` again queues every twin, and every tombstone
        (the index may still hold a twin deleted meanwhile), for the service's indexer.
        """
        kept = _meta(conn, "outbox")
        if kept is None:
            # Databases from before this record: the built-in index was kept last time
            # exactly when the outbox was not. (Unknown for a new database: nothing to fill.)
            kept = 0 if _meta(conn, "builtin_index") == 1 else 1
        if self._config.outbox and not kept:
            # One version for all: above any the index has seen, below any later write.
            (last,) = conn.execute(LAST_SEQ_SQL).fetchone()
            queued = queue_every_twin(conn, last)
            log.warning(
                "queued %d twins and tombstones of %s for the external search index "
                "(search was not elasticsearch when they were written)",
                queued,
                self._config.path.name,
            )
        _set_meta(conn, "outbox", 1 if self._config.outbox else 0)

    def _sync_builtin_index(self, conn: sqlite3.Connection, restored: bool) -> None:
        """Record whether the built-in index is maintained; rebuild it when it was not, when
        another version of it (:data:`search.sqlite.VERSION`) wrote it, or when ``restored``
        raised every twin's revision and versions (they are indexed).

        A database used with an external index (builtin off) has a stale built-in index; the
        first start with it on again re-indexes every twin, inside the opening transaction.
        """
        builtin = self._config.builtin_index
        was_on = _meta(conn, "builtin_index") in (None, 1)
        version = _meta(conn, "builtin_index_version")
        if builtin and (restored or not was_on or version != sqlite_index.VERSION):
            if conn.execute("SELECT 1 FROM twins LIMIT 1").fetchone() is not None:
                log.warning(
                    "rebuilding the built-in search index of %s (%s)",
                    self._config.path.name,
                    "it was off"
                    if not was_on
                    else f"version {version} -> {sqlite_index.VERSION}"
                    if version != sqlite_index.VERSION
                    else "the twins' revisions were raised",
                )
            # Dropped, not emptied: another version's tables may lack columns.
            for table in sqlite_index.TABLES:
                conn.execute(f"DROP TABLE IF EXISTS {table}")
            for statement in sqlite_index.SCHEMA:
                conn.execute(statement)
            # In pages, not one fetchall(): a large database does not fit in memory twice.
            after = ""
            while rows := conn.execute(
                "SELECT twin_id, doc FROM twins WHERE twin_id > ? ORDER BY twin_id LIMIT ?",
                (after, REBUILD_PAGE),
            ).fetchall():
                for _, doc in rows:
                    sqlite_index.index_twin(conn, document_from_storage(json.loads(doc)))
                after = rows[-1][0]
            _set_meta(conn, "builtin_index_version", sqlite_index.VERSION)
        _set_meta(conn, "builtin_index", 1 if builtin else 0)

    # -- commits ---------------------------------------------------------------------------

    def commit(self, writes: list[WireWrite]) -> list[int | BaseException]:
        """One transaction for ``writes``; per write, its journal sequence number or its
        :class:`RevisionConflict` (a refused write changes nothing)."""
        conn = self._conn
        assert conn is not None
        outcomes: list[int | BaseException] = []
        try:
            with _immediate(conn):
                for write in writes:
                    # A refused write is refused before it changes anything: no savepoint
                    # (each one journals every page its write changes) to roll it back.
                    try:
                        current = self._check(conn, write)
                    except RevisionConflict as exc:
                        self._indexed.pop(write[0], None)
                        # Without its traceback: that references this frame, whose `writes`
                        # and `outcomes` hold the exception, a cycle keeping the whole batch
                        # alive until a full garbage collection.
                        outcomes.append(exc.with_traceback(None))
                        continue
                    outcomes.append(self._apply(conn, write, current))
                self._batches += 1
                if self._batches % 100 == 1:
                    self._prune_by_age(conn)
                    self._pruned_at = time.monotonic()
        except BaseException:
            self._indexed.clear()  # what it says may have been rolled back
            raise
        return outcomes

    @staticmethod
    def _check(conn: sqlite3.Connection, write: WireWrite) -> tuple[int, str] | None:
        """The stored twin's (revision, incarnation), or ``None`` when there is none;
        :class:`RevisionConflict` when ``write`` was computed from another version."""
        twin_id, expected, incarnation = write[:3]
        row: tuple[int, str] | None = conn.execute(
            f"SELECT revision, {INCARNATION_SQL} FROM twins WHERE twin_id = ?",
            (twin_id,),
        ).fetchone()
        # A creation goes on from the id's tombstone, or a restore's floor (a rare write: one
        # more lookup).
        current = row[0] if row else conn.execute(CREATED_FROM_SQL, (twin_id,)).fetchone()[0] or 0
        if current != expected:
            raise RevisionConflict(f"Twin {twin_id} is at revision {current}, not {expected}.")
        # Revisions restarted at 1 for twins deleted before there were tombstones: the
        # incarnation tells them apart, so a change computed from an older one cannot slip
        # through.
        if row and incarnation is not None and row[1] != incarnation:
            raise RevisionConflict(f"Twin {twin_id} was deleted and created again.")
        return row

    def _apply(
        self, conn: sqlite3.Connection, write: WireWrite, row: tuple[int, str] | None
    ) -> int:
        """Store ``write``, which :meth:`_check` accepted (``row`` is what it found)."""
        twin_id, _, _, twin, (event_revision, timestamp, event) = write
        current = row[0] if row else 0
        state: str | None = None
        builtin = self._config.builtin_index
        indexed = self._indexed.pop(twin_id, None)
        if twin is None:
            # The versions as stored: they are what the next twin of the id goes on from.
            conn.execute(
                "INSERT OR REPLACE INTO tombstones "
                "(twin_id, revision, desired_version, reported_version) "
                "SELECT twin_id, ?, COALESCE(json_extract(doc, '$.desiredVersion'), 0), "
                "COALESCE(json_extract(doc, '$.reportedVersion'), 0) "
                "FROM twins WHERE twin_id = ?",
                (event_revision, twin_id),
            )
            conn.execute("DELETE FROM twins WHERE twin_id = ?", (twin_id,))
            if builtin:
                sqlite_index.unindex_twin(conn, twin_id)
        else:
            namespace, revision, new_incarnation, stored = twin
            state = stored.decode()
            if row is None and write[1] > 0:  # a creation that goes on from a tombstone
                conn.execute("DELETE FROM tombstones WHERE twin_id = ?", (twin_id,))
            conn.execute(
                "INSERT INTO twins (twin_id, namespace, revision, doc) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (twin_id) DO UPDATE SET revision = excluded.revision, "
                "doc = excluded.doc",
                (twin_id, namespace, revision, state),
            )
            if builtin:
                # Only the document indexed at the revision and incarnation being replaced
                # describes the rows in the index.
                old_doc = (
                    indexed[2]
                    if row and indexed is not None and indexed[:2] == (current, row[1])
                    else None
                )
                doc = document_from_storage(_load_exact(stored))
                sqlite_index.index_twin(conn, doc, old_doc)
                self._indexed[twin_id] = (revision, new_incarnation, doc)
                if len(self._indexed) > self._config.settings.twin_cache:
                    self._indexed.popitem(last=False)
        cursor = conn.execute(
            "INSERT INTO events (twin_id, revision, ts, event, state) VALUES (?, ?, ?, ?, ?)",
            (twin_id, event_revision, timestamp, event.decode(), state),
        )
        keep = self._config.stream.journal_max_per_twin
        # Prune in chunks (every 64 revisions) so the common write pays nothing for it.
        if event_revision > keep and event_revision % 64 == 0:
            oldest = conn.execute(
                "SELECT seq FROM events WHERE twin_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?",
                (twin_id, keep),
            ).fetchone()
            if oldest is not None:
                # The event before the kept ones stays, as pruning by age keeps one: below
                # pruned_seq no reader replays it, but the twin's next change is compared with
                # its state (a change stream's ``left``, or a deletion, needs it).
                conn.execute(
                    "DELETE FROM events WHERE twin_id = ? AND seq < ?", (twin_id, oldest[0])
                )
                _record_pruned(conn, oldest[0])
        seq = cursor.lastrowid
        assert seq is not None
        if self._config.outbox:
            conn.execute(
                "INSERT INTO index_outbox (twin_id, seq, first_seq) VALUES (?, ?, ?) "
                "ON CONFLICT (twin_id) DO UPDATE SET seq = excluded.seq",
                (twin_id, seq, seq),
            )
        return seq

    def prune_when_due(self) -> float:
        """Prune by age in a transaction of its own when the last prune is
        :data:`PRUNE_EVERY_SECONDS` old (commits alone prune only every 100th time: on a
        service no longer written to, what aged out stayed for good); the seconds until
        the next is due."""
        conn = self._conn
        assert conn is not None
        every = min(PRUNE_EVERY_SECONDS, self._config.stream.journal_max_age_seconds / 10)
        wait = self._pruned_at + every - time.monotonic()
        if wait > 0:
            return wait
        try:
            with _immediate(conn):
                self._prune_by_age(conn)
        except sqlite3.Error as exc:  # locked by another process, the disk full: next time
            log.warning("pruning the journal by age failed: %s", exc)
        self._pruned_at = time.monotonic()
        return every

    def _prune_by_age(self, conn: sqlite3.Connection) -> None:
        age = self._config.stream.journal_max_age_seconds
        cutoff = datetime.now(UTC) - timedelta(seconds=age)
        stamp = cutoff.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        (latest,) = conn.execute(LATEST_EXPIRED_SQL, (stamp,)).fetchone()
        since = _meta(conn, "aged_seq") or 0
        if latest is not None and latest > since:
            for sql in PRUNE_AGED_SQL:
                conn.execute(sql, {"since": since, "latest": latest})
            _set_meta(conn, "aged_seq", latest)
            _record_pruned(conn, latest)

    def mark_indexed(self, acknowledged: list[tuple[str, int]]) -> None:
        """Drop outbox rows ``(twin_id, seq)`` an external index has taken. A row whose
        twin was written again since keeps its newer seq, and its writes up to ``seq`` are
        indexed: left as the first pending one, a twin written faster than the indexer
        takes it would hold every wait for a write after its first one for good."""
        conn = self._conn
        assert conn is not None
        with _immediate(conn):
            conn.executemany("DELETE FROM index_outbox WHERE twin_id = ? AND seq = ?", acknowledged)
            conn.executemany(
                "UPDATE index_outbox SET first_seq = MAX(first_seq, :seq + 1) "
                "WHERE twin_id = :twin AND seq > :seq",
                [{"twin": twin_id, "seq": seq} for twin_id, seq in acknowledged],
            )


def _migrate_outbox(conn: sqlite3.Connection) -> None:
    """Give an outbox from before ``first_seq`` the column and its index. Its rows only
    know their twin's latest write, which becomes the first as well: what that outbox
    counted as indexed stays so, as before (the next write of the twin is exact)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(index_outbox)")}
    if "first_seq" not in columns:
        conn.execute("ALTER TABLE index_outbox ADD COLUMN first_seq INTEGER NOT NULL DEFAULT 0")
        conn.execute("UPDATE index_outbox SET first_seq = seq")
        conn.execute("DROP INDEX IF EXISTS index_outbox_by_seq")
    # The indexer takes the longest waiting twins first, and waits read the lowest.
    conn.execute("CREATE INDEX IF NOT EXISTS index_outbox_by_first_seq ON index_outbox (first_seq)")


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: taken at once (``BEGIN IMMEDIATE``, so two processes never
    both read, then both fail to upgrade their lock), committed when the block ends,
    rolled back when it raises. A failed ``COMMIT`` (SQLITE_FULL) may already have ended
    the transaction, so the rollback is made only when one is still open."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _log_restore(path: Path, restored: Restored, outbox: bool) -> None:
    log.warning(
        "%s was restored from a backup (its journal ends at seq %d): every event seq, "
        "revision, desiredVersion and reportedVersion now goes on from %d or above (the "
        "next seq is above %d), so none the lost database handed out is handed out again; stream "
        "readers resuming from before are asked to resync, devices get deltas newer than "
        "any they applied%s (docs/backup.md)",
        path.name,
        restored.backup_seq,
        restored.floor,
        restored.seq,
        "; the Elasticsearch index still holds twins this database no longer has: run "
        "`twin-service index rebuild`"
        if outbox
        else "",
    )


#: A run of digits as long as the shortest integer orjson reads as a float (-2**63 - 1).
_LONG_DIGITS = re.compile(rb"\d{19}")


def _load_exact(stored: bytes) -> Any:
    """The stored JSON decoded with its integers exact. orjson is the fast way, but reads
    integers beyond 64 bits as floats (2**64 as 2**64 - 1 would be, so the index found one
    for the other); ``json`` is exact, and a document where one could be is rare."""
    return json.loads(stored) if _LONG_DIGITS.search(stored) else orjson.loads(stored)


def _meta(conn: sqlite3.Connection, key: str) -> int | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else None


def _set_meta(conn: sqlite3.Connection, key: str, value: int) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def _record_pruned(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('pruned_seq', ?) "
        "ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
        (seq,),
    )


# -- the writer process ----------------------------------------------------------------------


def serve(channel: Connection) -> int:
    """Answer requests on ``channel`` in order until told to stop or the parent is gone.

    The first message is the :class:`WriterConfig`; the answer is ``("ok", None)`` once the
    database is open. Then each request ``(kind, payload)`` gets ``("ok", result)`` or
    ``("error", exception)``, in the order the requests came.
    """
    config: WriterConfig = pickle.loads(channel.recv_bytes())
    logging.basicConfig(level=config.log_level, format="%(levelname)s %(name)s: %(message)s")
    writer = SqliteWriter(config)
    try:
        writer.open()
    except Exception as exc:
        channel.send_bytes(pickle.dumps(("error", exc.with_traceback(None))))
        return 1
    if config.gc_thresholds is not None:
        # The documents this process last indexed (twin_cache of them) are thousands of
        # dicts: with CPython's defaults, a full collection walked them about every 15 s
        # under PATCH at 10,000 twins, 22-110 ms each, with every commit waiting.
        tune_gc(config.gc_thresholds)
    # Whether the database was restored: the service clears what the lost one left on the
    # broker (connectivity.sync_deltas).
    channel.send_bytes(pickle.dumps(("ok", writer.restored is not None)))
    # Connection.poll() builds, fills and closes a selector on every call: 4% of the CPU of
    # a PATCH (service and writer, bench.ab). One poll object, made once, is one syscall.
    # (A Connection buffers nothing beyond the message it reads: readable means a request.)
    incoming = select.poll()
    incoming.register(channel.fileno(), select.POLLIN)
    try:
        while True:
            try:
                # Between requests, and while none comes: the prunes commits did not make.
                if not incoming.poll(writer.prune_when_due() * 1000):
                    continue
                kind, payload = pickle.loads(channel.recv_bytes())
            except (EOFError, OSError):  # the parent is gone
                return 0
            if kind == "stop":
                return 0
            reply: tuple[str, Any]
            try:
                if kind == "commit":
                    reply = ("ok", writer.commit(payload))
                elif kind == "mark_indexed":
                    writer.mark_indexed(payload)
                    reply = ("ok", None)
                else:
                    reply = ("error", ValueError(f"unknown request {kind!r}"))
            except Exception as exc:
                reply = ("error", exc.with_traceback(None))
            try:
                channel.send_bytes(pickle.dumps(reply))
            except OSError:
                return 0
    finally:
        writer.close()


def main(argv: list[str]) -> int:
    # Ctrl-C in a terminal, and its hangup when it closes, reach the whole process group:
    # the parent decides when the writer stops (after the last commit) and takes SIGHUP as
    # "reload the tokens file", so the writer ignores both.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return serve(Connection(int(argv[0])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
