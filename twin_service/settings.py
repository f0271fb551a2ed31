"""The one settings object, validated at start-up.

Sources, highest priority first: constructor arguments (the CLI), ``TWIN_*`` environment
variables (nested sections with ``__``, e.g. ``TWIN_LIMITS__MAX_TWIN_BYTES``), an optional
TOML file (``--config`` or ``TWIN_CONFIG_FILE``), then the defaults below. Every field is
listed in docs/configuration.md.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import stat
import sys
import tomllib
import traceback
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from connectivity.credentials import check_not_a_device
from connectivity.topics import TopicLayout
from twin_service.errors import InvalidTwinId
from twin_service.twin.ids import MAX_GENERATED_NAMESPACE, generate_twin_id, validate_namespace
from twin_service.twin.jsonvalue import Limits
from twin_service.urls import check_url

_Count = Annotated[int, Field(ge=0)]


class _Section(BaseModel):
    """A settings section or a token entry: an unknown key is refused, as at the top
    level. Ignored, a misspelt key quietly meant its default, which for a token's
    ``namespaces`` is every namespace."""

    model_config = ConfigDict(extra="forbid")


class LimitsSettings(_Section):
    max_twin_bytes: int = Field(
        64 * 1024,
        ge=1024,
        # MQTT's largest packet: a larger twin could never reach a device whole.
        le=256 * 1024 * 1024,
        description=(
            "Largest twin (compact JSON; its lifecycle not counted), at most 256 MiB. MQTT "
            "packets to and from the service may be twice as large, at least 2 MiB (the "
            "embedded broker's limit) and at most MQTT's 256 MiB; a device's get answer over "
            "that is refused (413 twin.toolarge)."
        ),
    )
    max_depth: int = Field(16, ge=2, le=64, description="Deepest nesting inside a twin.")
    max_key_length: int = Field(256, ge=1, le=4096, description="Longest key in a twin.")
    max_patch_operations: int = Field(
        1000,
        ge=1,
        description="Most operations in one JSON Patch (more: 400 limits.exceeded); each may "
        "cost up to the twin's size in work.",
    )
    max_request_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest HTTP request body or WebSocket message accepted."
    )
    max_head_bytes: int = Field(
        64 * 1024,
        ge=8 * 1024,
        description="Largest HTTP request line and headers accepted (WebSocket handshakes "
        "too); a larger head is refused with 431 and the connection closed.",
    )
    incoming_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024 * 1024,
        description="Bytes of HTTP request heads and bodies and WebSocket messages still "
        "arriving, of all connections of one process together; the connection whose bytes "
        "pass it is refused (503 service.busy, a WebSocket closed with 1013).",
    )
    read_timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Longest an HTTP request line and headers may take to arrive (from the "
        "connection's start, or a kept-alive connection's next request), and longest a "
        "request body may pause: then 408 and the connection closed.",
    )

    def to_limits(self) -> Limits:
        return Limits(
            max_twin_bytes=self.max_twin_bytes,
            max_depth=self.max_depth,
            max_key_length=self.max_key_length,
            max_patch_operations=self.max_patch_operations,
        )


def _check_namespace(namespace: str) -> str:
    # Accepted, a namespace no twin id can have left the token valid for nothing, silently.
    try:
        return validate_namespace(namespace)
    except InvalidTwinId:
        raise ValueError(
            'must be dotted words starting with a letter (e.g. org.acme.plant1), or "" (the '
            "empty namespace)"
        ) from None


_Namespace = Annotated[str, AfterValidator(_check_namespace)]


class TokenSettings(_Section):
    name: str
    token: str = Field(min_length=16)
    role: Literal["read", "write", "admin"] = "read"
    namespaces: list[_Namespace] | None = Field(
        None, description="Namespaces it may use; all if unset."
    )

    @field_validator("token")
    @classmethod
    def _fits_a_header(cls, token: str) -> str:
        # Any other token could never be sent: Starlette reads a header as Latin-1 (so no
        # UTF-8 text matches), the token's spaces are stripped, and control characters
        # end or break a header line. The message never repeats the token.
        if not all("!" <= c <= "~" for c in token):
            raise ValueError(
                "must be visible ASCII characters (no space, control or non-ASCII character): "
                "an HTTP Authorization header could never carry it"
            )
        return token


class AuthSettings(_Section):
    disabled: bool = Field(False, description="Development only; refused unless bound to loopback.")
    tokens: list[TokenSettings] = Field(
        default_factory=list, description="Bearer tokens (JSON list)."
    )
    tokens_file: Path | None = Field(
        None,
        description="JSON list of {name, token, role, namespaces}; any other key is refused. "
        "SIGHUP reads it again.",
    )


#: SQLite reads its PRAGMA numbers into a C int: a larger one silently became 0, which is no
#: wait for the write lock, no automatic checkpoint (the WAL grows for good), or no cache.
_C_INT_MAX = 2**31 - 1


class SqliteSettings(_Section):
    file_name: str = Field("twins.sqlite3", description="Database file in data_dir.")
    synchronous: Literal["NORMAL", "FULL"] = Field(
        "NORMAL", description="NORMAL survives a process crash; FULL also a power loss."
    )
    busy_timeout_ms: int = Field(
        10_000, ge=100, le=_C_INT_MAX, description="Wait for another process's write lock."
    )
    max_batch: int = Field(
        128,
        ge=1,
        description="Most writes grouped in one commit. A batch takes its share of the "
        "writes not yet answered (divided by batches_in_flight) up to this.",
    )
    batches_in_flight: int = Field(
        2,
        ge=1,
        le=64,
        description="Batches sent to the writer process before the first is answered, so "
        "it never waits for the event loop between two commits.",
    )
    page_size: int = Field(
        4096,
        ge=1024,
        le=65536,
        description="Page size (bytes, a power of two) of a new database; an existing one "
        "keeps its own (VACUUM INTO a new file converts it).",
    )

    @field_validator("page_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"{value} is not a power of two")
        return value

    max_database_mib: int = Field(
        0,
        ge=0,
        description="Largest size of the database (MiB; 0: no limit but the disk's). A write "
        "that would grow it further gets 507 store.full, as on a full disk, and changes "
        "nothing. A database already larger does not grow.",
    )
    cache_mib: int = Field(
        64,
        ge=1,
        le=_C_INT_MAX // 1024,  # SQLite takes it in KiB
        description="Page cache of each reading connection (MiB).",
    )
    writer_cache_mib: int = Field(
        4,
        ge=1,
        le=_C_INT_MAX // 1024,
        description="Page cache of the writing connection (MiB). Small on purpose: a commit "
        "whose B-tree balancing renumbered a page walks the whole cache (SQLite borrows the "
        "lock page's number for the swap), and the writer reads through the memory map. "
        "4 instead of 64: about 12% less CPU per PATCH (docs/performance.md).",
    )
    mmap_mib: int = Field(
        256, ge=0, description="Memory-mapped I/O per connection (MiB; 0 turns it off)."
    )
    read_threads: int = Field(4, ge=1, le=64, description="Threads for searches and scans.")
    wal_autocheckpoint: int = Field(
        10_000,
        ge=0,
        le=_C_INT_MAX,
        description="WAL pages after which a commit copies them back into the "
        "database (whatever the background checkpoint has not copied yet). SQLite's default "
        "of 1000, with checkpoint_interval_ms 0, trades throughput for a shorter tail: "
        "PATCH p99 29 instead of 60 ms, at 1,770 instead of 2,254 PATCH/s, measured against "
        "a checkpoint_interval_ms of 250 (docs/performance.md).",
    )
    checkpoint_interval_ms: int = Field(
        50,
        ge=0,
        # One hour: far past any use, and a thread's wait of more than threading.TIMEOUT_MAX
        # (about 292 years) raised OverflowError and ended the checkpoint thread.
        le=3_600_000,
        description="A background thread copies committed WAL pages into the database at "
        "this interval, so commits rarely do it themselves (0 turns it off). When the WAL "
        "reaches wal_autocheckpoint pages, the writer still finishes a checkpoint itself "
        "(its fsyncs are the PATCH tail): the shorter the interval, the less is left for "
        "it. 50 instead of 250 ms: PATCH p99 about 43 instead of 58 ms at the same rate. "
        "At most 3600000 (an hour).",
    )
    twin_cache: int = Field(
        10_000,
        ge=0,
        description="Decoded twins kept for reads (each read still checks its revision in "
        "the database; 0 turns the cache off); the writer process keeps as many indexed "
        "documents to diff the next write of each twin against.",
    )


#: BSON's 16 MiB, less room for events still pending in the document (MongoDB appends the
#: new one) and for the update command around it.
_MAX_BSON_DOCUMENT = 16 * 1024 * 1024 - 64 * 1024


#: A day, the bound of PyMongo's timeouts: past a billion seconds PyMongo refused them at start,
#: in a traceback; a day is already far past any use.
_DAY_MS = 24 * 3600 * 1000

#: Characters MongoDB refuses in a database name (on every platform).
_NOT_IN_DATABASE = frozenset('/\\. "$\x00')


class MongoSettings(_Section):
    database: str = Field(
        "twin_service",
        description="Database holding the twin collections (MongoDB's rules: 1 to 63 bytes, "
        'none of `/\\. "$` and NUL).',
    )
    write_concern: str = Field(
        "majority",
        description="Write concern w of every write: majority or a number of members, at "
        "least 1 (0, unacknowledged writes, could lose one the service answered for).",
    )

    @field_validator("database")
    @classmethod
    def _check_database(cls, name: str) -> str:
        # MongoDB's rules for a database name, checked here: pymongo's InvalidName was a
        # traceback at start (exit 3).
        if not name or len(name.encode()) > 63 or any(c in _NOT_IN_DATABASE for c in name):
            raise ValueError(
                "must be 1 to 63 bytes and hold none of /\\. \"$ and NUL (MongoDB's rules)"
            )
        return name

    @field_validator("write_concern")
    @classmethod
    def _check_write_concern(cls, w: str) -> str:
        # Not 0: the driver refused it at start, in its own words, and unacknowledged
        # writes could be lost after the service had answered for them.
        if w != "majority" and not (w.isascii() and w.isdigit() and int(w) > 0):
            raise ValueError("must be majority or a number of members, at least 1")
        return w

    read_preference: Literal[
        "primary", "primaryPreferred", "secondary", "secondaryPreferred", "nearest"
    ] = Field(
        "primary",
        description="Where GET and search read twins; writes and the journal use the primary.",
    )
    server_selection_timeout_ms: int = Field(
        5000,
        ge=100,
        le=_DAY_MS,
        description="How long the driver waits for a usable server where no operation "
        "timeout applies; store operations wait within operation_timeout_ms instead "
        "(PyMongo's timeoutMS replaces it). At most a day (86400000).",
    )
    # 10 s: a GET or a write takes milliseconds on a server that answers, and a search page
    # or a count, which scan every twin on FerretDB (about 30 us a small twin measured, see
    # docs/scaling.md), a few seconds at 100,000 twins. It stays below shutdown_timeout_seconds
    # (20) and the 30-60 s after which proxies and clients give up, so a frozen server is a
    # 503 they see rather than a hang of theirs. Store work that touches every twin at once
    # (index builds at start, maintenance rounds) has longer bounds of its own (mongodb.py).
    operation_timeout_ms: int = Field(
        10_000,
        ge=100,
        le=_DAY_MS,
        description="How long one store operation (a read, a write, a journal read) may wait "
        "for the server, retries and server selection included, before it fails with 503 "
        "service.unavailable: a server that takes connections and answers nothing holds a "
        "request this long at most (docs/scaling.md). At most a day (86400000).",
    )
    max_pool_size: int = Field(100, ge=1, description="Connections per replica to the server.")
    gap_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="How long a reader of the journal waits for an allocated sequence number "
        "to be committed before it fences the number off. On FerretDB, a claim of a twin's "
        "version seen held for 1.5 times this is taken for a dead writer's (docs/scaling.md).",
    )
    maintenance_interval_seconds: float = Field(
        5.0, gt=0, description="Journal retention, stray-event sweep and tombstone cleanup period."
    )
    max_document_bytes: int = Field(
        4 * 1024 * 1024,
        ge=64 * 1024,
        le=_MAX_BSON_DOCUMENT,
        description="Largest stored form of one twin in MongoDB (BSON: its JSON, its "
        "pending change event and a search field per path of every node, so deep or long "
        "paths multiply it), at most 16 MiB less 64 KiB. A write that would exceed it gets "
        "413 twin.toolarge and changes nothing (docs/scaling.md).",
    )
    start_wait_seconds: float = Field(
        math.inf,
        ge=0,
        description="How long a starting service waits for a MongoDB that does not answer "
        "(inf: until it does; 0: exit at once, status 3). Meanwhile /health answers, /ready "
        "and every other request 503 service.starting.",
    )


class SearchSettings(_Section):
    default_size: int = Field(25, ge=1, description="Search page size without size().")
    max_size: int = Field(200, ge=1, description="Largest size() and ids per GET /twins.")


class MqttSettings(_Section):
    enabled: bool = Field(True, description="Device sync over MQTT.")
    embedded_host: str = Field("127.0.0.1", description="Built-in broker address (no mqtt_url).")
    # Not 0: the service's own client dials this port, not the one the OS would pick.
    embedded_port: int = Field(1883, ge=1, le=65535, description="Built-in broker port.")
    embedded_max_devices: int = Field(
        2000,
        ge=1,
        description="Device connections the built-in broker holds at once (about 54 KB "
        "each); one more is refused with CONNACK 3, server unavailable.",
    )
    embedded_max_connecting: int = Field(
        200,
        ge=1,
        description="Connections to the built-in broker still sending their CONNECT (up to "
        "10 s and 64 KiB each); one more is closed at once.",
    )
    embedded_max_queued: int = Field(
        1000,
        ge=1,
        description="Messages the built-in broker keeps for one offline persistent "
        "session (queued, or sent and not acknowledged before it went away); past it the "
        "oldest are dropped (a newer delta supersedes them). Also the messages sent to a "
        "connected device that it has not acknowledged; one more is dropped.",
    )
    embedded_max_sessions_per_device: int = Field(
        4,
        ge=1,
        description="Sessions (client ids) one device may hold on the built-in broker; a "
        "login past it ends the device's longest offline session, or is refused (CONNACK 3) "
        "when they are all connected.",
    )
    embedded_max_subscriptions: int = Field(
        100,
        ge=1,
        description="Topic filters one client (the service excepted) may subscribe to on the "
        "built-in broker; one more gets the SUBACK failure code (0x80).",
    )
    embedded_max_inflight: int = Field(
        100,
        ge=1,
        description="Messages one device connection may have in flight on the built-in "
        "broker (read, and not yet acknowledged by the service, or handed to it for QoS 0); "
        "at it, the broker reads nothing more from the connection until one is.",
    )
    embedded_max_keep_alive_seconds: int = Field(
        1200,
        ge=1,
        le=65535,
        description="Longest keep-alive the built-in broker holds a device to: one that asks "
        "for more, or for none (0), is disconnected (its last will sent) after one and a half "
        "times this much silence, as AWS IoT does (1200 s).",
    )
    topic_prefix: str = Field(
        "twins/{twinId}",
        description="Device topics; {twinId} must be one whole topic level, once; no "
        "wildcard, no control character, and no '$' at the start.",
    )
    client_id: str = Field(
        "twin-service",
        min_length=1,
        description="MQTT client id; stable and different for each replica. After each "
        "connection a second, short clean session <client_id>-retained reads the retained "
        "deltas (brokers that restrict client ids must allow it too).",
    )
    shared_group: str = Field(
        "auto",
        description="Shared-subscription group of the device topics (MQTT 5): a secret, as a "
        "device that joins it makes the broker drop a share of other devices' messages. auto "
        "derives one from the service's broker password (twin-service when it has none: "
        "guessable, warned about at start); empty disables sharing.",
    )
    protocol: Literal[5, 4] = Field(5, description="MQTT 5, or 3.1.1 (4), to external brokers.")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_from_text(cls, value: object) -> object:
        # An environment variable is text, which the literal 5 or 4 never equals: every
        # TWIN_MQTT__PROTOCOL was refused, though TOML and JSON numbers worked.
        return int(value) if isinstance(value, str) and value in ("4", "5") else value

    service_username: str = Field(
        "twin-service",
        description="The service's broker user; never a device's username (a twin id, its "
        "':' as such or as %3A), which that device could log in with.",
    )
    service_password: str | None = Field(
        None, description="The service's broker password (generated for the built-in broker)."
    )
    lastseen_coalesce_seconds: float = Field(
        5.0, ge=0, description="At most one lastSeen write per twin per this period."
    )
    client_token_memory: int = Field(
        32, ge=0, description="Client tokens kept per twin for dedupe."
    )
    max_inflight: int = Field(64, ge=1, description="Device messages handled concurrently.")
    max_unacked_replies: int = Field(
        1000,
        ge=1,
        description="Replies to devices that may wait for the broker's PUBACK; past that, "
        "handlers wait, which slows intake (bounds the queue, and how long a delta waits "
        "behind it).",
    )
    session_expiry_seconds: int = Field(
        7 * 24 * 3600,
        ge=60,
        # MQTT 5's Session Expiry Interval is a four-byte integer: paho's thread died of
        # struct.error past it, and the service never connected.
        le=2**32 - 1,
        description="How long the broker keeps the service's session and queued messages "
        "(at most 4294967295, MQTT's largest).",
    )
    connect_timeout_seconds: float = Field(
        10.0, gt=0, description="Wait at start-up for the broker before starting anyway."
    )
    ca_file: str | None = Field(None, description="CA bundle for mqtts:// brokers.")
    cert_file: str | None = Field(None, description="Client certificate for mqtts:// brokers.")
    key_file: str | None = Field(None, description="Key of the client certificate.")

    @field_validator("service_username")
    @classmethod
    def _check_service_username(cls, user: str) -> str:
        # The device of a twin whose id the name decodes to would log in as the service's
        # username on the built-in broker too (with its own password), or as the service
        # in mosquitto, whose files export-mosquitto refuses to write for such a name.
        check_not_a_device(user)
        return user

    @field_validator("topic_prefix")
    @classmethod
    def _check_topic_prefix(cls, prefix: str) -> str:
        # What the service and export-mosquitto build their topics with, checked here so
        # that a bad prefix is one line naming the setting, not a service that never
        # subscribed (paho refused the filter in a background task) yet said it was ready.
        TopicLayout(prefix)
        return prefix


class ElasticsearchSettings(_Section):
    index_name: str = Field("twins", description="Name (alias) of the twin index.")
    batch_size: int = Field(500, ge=1, description="Twins per bulk request of the indexer.")
    bulk_max_bytes: int = Field(
        10 * 1024 * 1024,
        ge=64 * 1024,
        description="Largest body of one bulk request (keep it below the engine's "
        "http.max_content_length, 100mb by default): batches are split to fit, and a twin "
        "whose index document alone is larger is not indexed (its old document is removed "
        "and the log names it).",
    )
    poll_interval_seconds: float = Field(0.05, gt=0, description="Indexer idle poll interval.")
    wait_timeout_seconds: float = Field(10.0, gt=0, description="Longest wait for the index.")
    request_timeout_seconds: float = Field(
        30.0, gt=0, description="Timeout of one request to Elasticsearch."
    )
    start_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="How long a starting service waits for the engine to make sure of the "
        "index before it serves all the same (the check goes on in the background).",
    )
    retry_initial_seconds: float = Field(
        0.1, gt=0, description="First indexer backoff after a failed bulk request."
    )
    retry_max_seconds: float = Field(
        10.0, gt=0, description="Longest indexer backoff (doubling from the first)."
    )
    shards: int = Field(1, ge=1, description="Primary shards of a new twin index.")
    replicas: int = Field(1, ge=0, description="Replicas of a new twin index.")
    refresh_interval: str = Field(
        "1s", description="How often new writes become searchable without waiting (ES syntax)."
    )
    ca_file: str | None = Field(
        None,
        description="CA bundle that signed the engine's certificate, for an https:// URL "
        "whose certificate is not signed by a public CA (ECK makes its own).",
    )
    api_key: str | None = Field(
        None,
        description="API key, sent as Authorization: ApiKey (or a user and password in "
        "elasticsearch_url).",
    )


#: 100 years: the bound of durations subtracted from now (which must stay after year 1).
_CENTURY_SECONDS = 100 * 366 * 24 * 3600


class StreamSettings(_Section):
    journal_max_per_twin: int = Field(1000, ge=1, description="Events kept per twin (at least).")
    journal_max_age_seconds: int = Field(
        7 * 24 * 3600,
        ge=60,
        # Subtracted from now: past year 1 every write's pruning raised OverflowError (500).
        le=_CENTURY_SECONDS,
        description="Events older than this are removed, but for each existing twin's newest "
        "(its next change is compared with it); at most 100 years.",
    )
    queue_size: int = Field(
        1000, ge=10, description="Messages buffered per WebSocket/SSE client before it is cut."
    )
    queue_bytes: int = Field(
        8 * 1024 * 1024,
        ge=64 * 1024,
        description="Bytes of messages buffered per WebSocket/SSE client before it is cut "
        "(whichever of queue_size and this comes first).",
    )
    total_queue_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024 * 1024,
        description="Bytes of messages buffered for all WebSocket/SSE clients of one process: "
        "past it, each client that is behind is cut (as past queue_bytes).",
    )
    max_connections: int = Field(
        2000,
        ge=1,
        description="WebSocket and server-sent-event readers one process serves at once; "
        "past it a new one is refused (503 stream.toomany, a WebSocket closed with 1013). "
        "Each is a file descriptor and some memory for good.",
    )
    max_subscriptions: int = Field(
        100, ge=1, description="Subscriptions one WebSocket connection may hold at once."
    )
    max_listed: int = Field(
        10_000,
        ge=1,
        description="Twin ids, namespaces and filter in() values the subscriptions of one "
        "WebSocket connection (or one event stream) may list in all ('twins', 'namespaces', "
        "'filter'); a namespace or a filter's condition covers any number of twins.",
    )
    max_in_flight: int = Field(
        64,
        ge=1,
        description="Messages of one WebSocket connection handled at once (commands, "
        "subscribes); the connection is read no further until one is done, so a client that "
        "sends faster than it is served is held back by TCP instead of piling up work.",
    )
    poll_interval_seconds: float = Field(
        1.0,
        gt=0,
        description="Journal poll interval when no commit notice arrives; also how often "
        "the expiry sweeper reads the journal for the times to live other processes set.",
    )
    bus: Literal["auto", "inprocess", "mqtt"] = Field(
        "auto",
        description="Commit notices between processes; auto = mqtt when mqtt_url is set.",
    )
    websocket_deflate: bool = Field(
        False,
        description="Accept per-message deflate offered by WebSocket clients; costs server CPU "
        "for every message sent (see docs/performance.md, issue 5).",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TWIN_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    data_dir: Path = Field(
        Path("./data"), description="SQLite file, admin token, device credentials."
    )
    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info",
        description="Level of the service's log lines (stderr) and uvicorn's; "
        "libraries' lines from WARNING up, the Elasticsearch client's from ERROR (the "
        "service reports what failed itself; at debug, both from INFO).",
    )
    default_namespace: str = Field("default", description="Namespace of ids made by POST /twins.")
    shutdown_timeout_seconds: int = Field(
        20,
        ge=1,
        description="On SIGTERM, how long requests in flight may run on before they are "
        "answered 503 service.stopping and the service stops (keep it below the pod's "
        "terminationGracePeriodSeconds).",
    )
    ready_check_timeout_seconds: float = Field(
        2.0,
        gt=0,
        le=60,
        description="How long /ready and /metrics wait for each check (store, index, broker, "
        "run side by side); one that has not answered by then is down. Keep it below the "
        "readiness probe's timeoutSeconds (3 in deploy/kubernetes), so that a search engine "
        "that hangs does not fail a probe that requires only the store.",
    )
    api_hot_routes: bool = Field(
        True,
        description="Serve the whole-twin GET and PATCH ahead of FastAPI's middleware, routing "
        "and dependencies (same endpoints, checks and error bodies; about a fifth less CPU "
        "per request). Turn off to have middleware, such as FastAPI's OpenTelemetry "
        "instrumentation, see those requests too.",
    )
    gc_thresholds: tuple[_Count, _Count, _Count] = Field(
        (700, 10, 1000),
        description="Python garbage collector thresholds (gc.set_threshold) of serve. "
        "CPython's third, 10, ran a full collection of all cached twins every few seconds "
        "under writes (~150 ms pauses).",
    )
    store: Literal["sqlite", "mongodb"] = Field("sqlite", description="Twin store.")
    mongodb_url: str | None = Field(None, description="MongoDB URL (store=mongodb).")
    search: Literal["builtin", "elasticsearch", "off"] = Field(
        "builtin",
        description="Search index: builtin (kept by the store in the same transaction), "
        "elasticsearch, or off (the search API answers 404 search.disabled and the SQLite "
        "store writes no index rows; builtin again rebuilds them on start, and elasticsearch "
        "again has its indexer catch up on every write made meanwhile).",
    )
    elasticsearch_url: str | None = Field(
        None, description="Elasticsearch URL (search=elasticsearch)."
    )
    mqtt_url: str | None = Field(None, description="External broker; unset = embedded broker.")
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    sqlite: SqliteSettings = Field(default_factory=SqliteSettings)
    mongodb: MongoSettings = Field(default_factory=MongoSettings)
    query: SearchSettings = Field(default_factory=SearchSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    elasticsearch: ElasticsearchSettings = Field(default_factory=ElasticsearchSettings)

    @field_validator("data_dir")
    @classmethod
    def _check_data_dir(cls, data_dir: Path) -> Path:
        # Checked here, where every command meets it: a file there made each one fail in its
        # own words, none of them the cause ("File exists", "there is no twin store at").
        if data_dir.exists() and not data_dir.is_dir():
            raise ValueError(f"{data_dir} is not a directory")
        return data_dir

    @field_validator("default_namespace")
    @classmethod
    def _check_namespace(cls, namespace: str) -> str:
        # Checked here, or the service started and every POST /twins answered 400
        # twin.id.invalid. The generated id must fit too, as POST makes it.
        try:
            generate_twin_id(namespace)
        except InvalidTwinId:
            raise ValueError(
                "must be dotted words starting with a letter (e.g. org.acme.plant1), short "
                f"enough for a generated id (at most {MAX_GENERATED_NAMESPACE} characters)"
            ) from None
        return namespace

    @field_validator("mqtt_url", "mongodb_url", "elasticsearch_url")
    @classmethod
    def _check_url(cls, url: str | None, info: ValidationInfo) -> str | None:
        # Checked here, so that a typo is an invalid setting at once rather than a failed
        # start (or a broker client retrying forever) later.
        if url is not None:
            check_url(url, _URL_SCHEMES[info.field_name or ""])
        return url

    @model_validator(mode="after")
    def _refuse_insecure(self) -> Settings:
        if self.auth.disabled and not is_loopback(self.host):
            raise ValueError(
                "auth.disabled is a development switch and is refused unless host is a "
                f"loopback address (got {self.host!r})."
            )
        if self.store == "mongodb" and not self.mongodb_url:
            raise ValueError("store=mongodb needs mongodb_url (TWIN_MONGODB_URL).")
        if self.search == "elasticsearch" and not self.elasticsearch_url:
            raise ValueError("search=elasticsearch needs elasticsearch_url.")
        if self.elasticsearch.ca_file is not None and self.search == "elasticsearch":
            if not (self.elasticsearch_url or "").startswith("https://"):
                raise ValueError("elasticsearch.ca_file needs an https:// elasticsearch_url.")
            if not Path(self.elasticsearch.ca_file).is_file():
                raise ValueError("elasticsearch.ca_file: no such file.")
        if self.stream.bus == "mqtt" and not self.mqtt_url:
            raise ValueError("stream.bus=mqtt needs mqtt_url (an external broker).")
        if self.query.default_size > self.query.max_size:
            raise ValueError("query.default_size must not exceed query.max_size.")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file.get() or os.environ.get("TWIN_CONFIG_FILE")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)


#: The URL schemes each URL setting takes.
_URL_SCHEMES = {
    "mqtt_url": ("mqtt", "mqtts"),
    "mongodb_url": ("mongodb", "mongodb+srv"),
    "elasticsearch_url": ("http", "https"),
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings; a config file given here wins over ``TWIN_CONFIG_FILE``.

    Raises ValueError (pydantic's ValidationError is one) for invalid settings.
    """
    name = str(config_file) if config_file is not None else os.environ.get("TWIN_CONFIG_FILE")
    if name:
        _check_config_file(Path(name))
    token = _config_file.set(str(config_file) if config_file is not None else None)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{name} is not valid TOML: {exc}") from None
    except RecursionError as exc:  # the parsers recurse once per level of nesting
        frames = traceback.walk_tb(exc.__traceback__)
        if any(f.f_globals.get("__name__", "").startswith("tomllib") for f, _ in frames):
            raise ValueError(f"{name} is not valid TOML: nested too deeply") from None
        raise ValueError("A TWIN_* value is not valid JSON: nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except OSError as exc:  # read after the check: permissions, an I/O error
        raise ValueError(f"Config file {name} cannot be read: {exc.strerror or exc}.") from None
    finally:
        _config_file.reset(token)


def _check_config_file(path: Path) -> None:
    # Checked whether named by --config or TWIN_CONFIG_FILE: the settings source would
    # quietly skip a file that is missing, and a directory or a FIFO is no config either.
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"Config file {path} does not exist.") from None
    except OSError as exc:
        raise ValueError(f"Config file {path} cannot be read: {exc.strerror or exc}.") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"Config file {path} is a directory, not a TOML file.")
    if not stat.S_ISREG(mode):
        raise ValueError(f"Config file {path} is not a regular file.")


def settings_for_command(config_file: Path | None, **overrides: Any) -> Settings | None:
    """For the command line: the settings, or None after saying on stderr why they are
    invalid (the caller exits with status 2). A stray ``TWIN_*`` variable is named on stderr."""
    for line in stray_variables(os.environ):
        print(f"twin-service: warning: {line}", file=sys.stderr)
    try:
        return load_settings(config_file, **overrides)
    except ValueError as exc:  # pydantic's ValidationError included
        print(f"twin-service: invalid settings: {describe_invalid(exc)}", file=sys.stderr)
        return None


def stray_variables(environ: Mapping[str, str]) -> list[str]:
    """One line for each ``TWIN_*`` variable that is no setting, with the setting it may mean.

    Not refused, since other tools share the prefix (``TWIN_TOKEN`` of simulate, the test
    suite's ``TWIN_TEST_*``); but silently ignored, ``TWIN_AUTH_DISABLED`` (one underscore
    where a section takes two) left auth on and ``TWIN_MQTT_URL`` misspelt started the
    embedded broker, without a word. Names are read case-insensitively, as pydantic-settings
    reads them. An unknown key inside a section (``TWIN_LIMITS__NOPE``) is refused already.
    """
    top = {f"TWIN_{name.upper()}" for name in Settings.model_fields}
    sections = {
        f"TWIN_{name.upper()}__": field.annotation
        for name, field in Settings.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    }
    known = sorted(
        top
        | {prefix + key.upper() for prefix, model in sections.items() for key in model.model_fields}
    )
    lines = []
    for name in sorted(environ, key=str.upper):
        upper = name.upper()
        if (
            not upper.startswith("TWIN_")
            or upper in top
            or upper.startswith(tuple(sections))
            or upper in _OTHER_VARIABLES
            or upper.startswith("TWIN_TEST_")
        ):
            continue
        meant = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
        lines.append(
            f"{name} is not a setting and is ignored" + (f" ({meant[0]}?)" if meant else "")
        )
    return lines


#: ``TWIN_*`` variables read by other code than the settings.
_OTHER_VARIABLES = frozenset({"TWIN_CONFIG_FILE", "TWIN_TOKEN"})


def describe_invalid(exc: ValueError) -> str:
    """One line per problem, ``where: what``, without the values given: a setting or a
    token file holds secrets, which pydantic's own message would repeat."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    problems = exc.errors(include_url=False, include_input=False, include_context=False)
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or 'settings'}: "
        + problem["msg"].removeprefix("Value error, ")
        for problem in problems
    )


#: The TOML file given to :func:`load_settings` (a context variable, not the environment, so
#: loading settings never changes the process's environment).
_config_file: ContextVar[str | None] = ContextVar("twin_config_file", default=None)
