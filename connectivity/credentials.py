"""Device credentials, hashed at rest in mosquitto's ``$7$`` (PBKDF2-SHA512) format.

The same hash serves the embedded broker (which verifies it here) and mosquitto (which reads the
password file written by :meth:`CredentialStore.write_mosquitto_files`). mosquitto 2.x encodes a
hash as ``$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512(password, salt)>`` with
standard, padded base64, a 12-byte salt and a 64-byte key.

mosquitto cannot store a username containing ``:`` (``mosquitto_passwd`` refuses it, and the
broker splits password-file lines at the first ``:``), but twin ids look like
``org.acme:pump-1``. A device therefore connects with :func:`mqtt_username` of its twin id
(``org.acme%3Apump-1``); the embedded broker accepts both spellings. For the same reason the
mosquitto ACL names each device explicitly instead of using a ``pattern`` rule with ``%u``.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import functools
import grp
import hashlib
import hmac
import json
import os
import pwd
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectivity.topics import INBOUND, TopicLayout, check_twin_id_for_topics
from twin_service.errors import InvalidTwinId
from twin_service.twin.ids import parse_twin_id

#: Generated passwords carry 256 bits of entropy, so the KDF cost is not what protects them;
#: a modest count keeps CONNECT cheap on both brokers (mosquitto_passwd's own default is 101).
DEFAULT_ITERATIONS = 1000
SALT_BYTES = 12
FILE_NAME = "device-credentials.json"
_FORMAT = 1


class CredentialError(ValueError):
    """A device that does not exist, exists already, or has an unusable id."""


def hash_password(
    password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> str:
    """Hash ``password`` in mosquitto's ``$7$`` format."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def _parse_hash(encoded: str) -> tuple[int, bytes, bytes] | None:
    """``(iterations, salt, key)`` of a ``$7$`` hash, or None when it is not one."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7":
        return None
    # int() alone would take spaces and a newline, which would split a password-file line.
    if not (parts[2].isascii() and parts[2].isdigit()):
        return None
    iterations = int(parts[2])
    try:
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return None
    if not 0 < iterations <= 10_000_000:
        return None
    return iterations, salt, expected


def verify_password(password: str, encoded: str) -> bool:
    """Check ``password`` against a ``$7$`` hash in constant time; malformed hashes fail."""
    parsed = _parse_hash(encoded)
    if parsed is None:
        return False
    iterations, salt, expected = parsed
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return hmac.compare_digest(key, expected)


def mqtt_username(twin_id: str) -> str:
    """The MQTT username of a device: its twin id with ``%`` and ``:`` percent-encoded."""
    return twin_id.replace("%", "%25").replace(":", "%3A")


def twin_id_from_username(username: str) -> str:
    """Inverse of :func:`mqtt_username`; a raw twin id comes back unchanged."""
    return username.replace("%3A", ":").replace("%3a", ":").replace("%25", "%")


def _check_device_id(twin_id: str) -> None:
    try:
        parse_twin_id(twin_id)
    except InvalidTwinId as exc:  # credentials no twin could ever use
        raise CredentialError(f"{exc.message} {exc.description}") from None
    try:
        check_twin_id_for_topics(twin_id)
    except ValueError as exc:
        raise CredentialError(str(exc)) from None
    # Whitespace would split an ACL or password-file line.
    if any(ch.isspace() for ch in twin_id) or "%" in twin_id:
        raise CredentialError(f"twin id {twin_id!r} cannot be used as an MQTT username")


def check_service_user(user: str) -> str:
    """Return ``user`` if it can name the service account in mosquitto's files.

    mosquitto splits a password-file line at the first ``:`` and reads a line starting with
    ``#`` as a comment; whitespace or a control character would split or end an ACL line.
    An empty name wrote ``:$7$...`` and a bare ``user`` line.
    """
    if not user:
        raise CredentialError("the service user is empty")
    if ":" in user:
        raise CredentialError(
            f"service user {user!r} contains ':', where mosquitto splits a password-file line"
        )
    if any(ch.isspace() or not ch.isprintable() for ch in user):
        raise CredentialError(
            f"service user {user!r} contains whitespace or a control character, "
            "which mosquitto's files cannot hold in a name"
        )
    if user.startswith("#"):
        raise CredentialError(
            f"service user {user!r} starts with '#', which makes its lines comments to mosquitto"
        )
    check_not_a_device(user)
    return user


def check_not_a_device(user: str) -> None:
    """Refuse a service user that is also a device's username (the settings check it too).

    A device logs in as :func:`mqtt_username` of its twin id: with this name, the device of
    that twin would log in as the service, with the service's rights on every topic, in
    mosquitto; the built-in broker took it for the service when it chose who holds a
    session, and let the device take the service's session over.
    """
    with contextlib.suppress(InvalidTwinId):
        parse_twin_id(twin_id_from_username(user))
        raise CredentialError(f"service user {user!r} is the username of a device")


@dataclass(frozen=True)
class DeviceCredential:
    """What the store knows about one device (never the password)."""

    twin_id: str
    username: str
    created: str
    rotated: str | None


class CredentialStore:
    """A JSON file of ``twin id -> $7$ hash``, written atomically with mode 0600 (a replaced
    file keeps its owner, group and mode).

    Blocking file I/O: call it from a thread when on an event loop.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> CredentialStore:
        """The store at its standard place in the data directory."""
        return cls(data_dir / FILE_NAME)

    @property
    def lock_path(self) -> Path:
        """The sibling file writers lock (see :meth:`_changing`)."""
        return self.path.with_name(f".{self.path.name}.lock")

    def add(self, twin_id: str) -> str:
        """Create credentials for a new device; return its generated password (shown once)."""
        _check_device_id(twin_id)
        with self._changing():
            devices = self._load()
            if twin_id in devices:
                raise CredentialError(f"device {twin_id!r} already has credentials; rotate them")
            password = secrets.token_urlsafe(32)
            devices[twin_id] = {
                "hash": hash_password(password),
                "created": _now(),
                "rotated": None,
            }
            self._save(devices)
        return password

    def rotate(self, twin_id: str) -> str:
        """Replace a device's password; return the new one (shown once)."""
        with self._changing():
            devices = self._load()
            if twin_id not in devices:
                raise CredentialError(f"device {twin_id!r} has no credentials")
            password = secrets.token_urlsafe(32)
            entry = devices[twin_id]
            devices[twin_id] = {**entry, "hash": hash_password(password), "rotated": _now()}
            self._save(devices)
        return password

    def remove(self, twin_id: str) -> bool:
        """Delete a device's credentials; False if it had none."""
        with self._changing():
            devices = self._load()
            if devices.pop(twin_id, None) is None:
                return False
            self._save(devices)
        return True

    def list(self) -> list[DeviceCredential]:
        """Every device with credentials, sorted by twin id."""
        return [
            DeviceCredential(tid, mqtt_username(tid), entry["created"], entry.get("rotated"))
            for tid, entry in sorted(self._load().items())
        ]

    def verify(self, username: str, password: str) -> bool:
        """Check a device login; ``username`` may be the twin id or its MQTT spelling."""
        return self.verified_hash(username, password) is not None

    def verified_hash(self, username: str, password: str) -> str | None:
        """The stored hash a device login matches (``None``: refused). A broker keeps it to
        tell later whether those credentials still stand (see :meth:`hashes`)."""
        entry = self._load().get(twin_id_from_username(username))
        if entry is None or not verify_password(password, entry["hash"]):
            return None
        return str(entry["hash"])

    def hashes(self) -> dict[str, str]:
        """The stored hash of every device, by twin id."""
        return {tid: entry["hash"] for tid, entry in self._load().items()}

    def write_mosquitto_files(
        self,
        password_path: Path,
        acl_path: Path,
        service_user: str,
        topic_prefix: str,
        *,
        service_password: str | None = None,
        service_password_path: Path | None = None,
    ) -> None:
        """Write a mosquitto password file and ACL for every device plus the service account.

        The service account may use every topic; each device may read and write only under
        its own twin's prefix. The service account's password line goes into
        ``service_password_path`` when given (the shipped configuration's service listener,
        where devices cannot log in), else into ``password_path``; without
        ``service_password`` it is left out (add it with ``mosquitto_passwd``). Reload
        mosquitto (SIGHUP) afterwards. A service user mosquitto cannot hold (see
        :func:`check_service_user`) or an empty service password is refused.
        """
        check_service_user(service_user)
        if service_password_path is not None and service_password is None:
            raise CredentialError("a service password file needs the service password")
        if service_password == "":  # any client could log in as the service sending none
            raise CredentialError("the service password is empty")
        layout = TopicLayout(topic_prefix)
        devices = self._load()
        lines = [f"{mqtt_username(tid)}:{entry['hash']}" for tid, entry in sorted(devices.items())]
        files: dict[Path, str] = {}
        if service_password is not None:
            service_line = f"{service_user}:{hash_password(service_password)}"
            if service_password_path is not None:
                files[service_password_path] = service_line + "\n"
            else:
                lines.insert(0, service_line)
        files[password_path] = "".join(line + "\n" for line in lines)
        files[acl_path] = render_acl(service_user, layout, sorted(devices))
        _write_private(files)

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Hold the store's lock across a read-modify-write.

        Two ``devices add`` run at once each read the file, added their device and replaced
        it: the later replace dropped the other's device, though both had printed a
        password. Readers need no lock (the file is replaced atomically). The lock is a
        sibling file, never removed: removing it would let two writers lock two files.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed, or the process ends
            yield
        finally:
            os.close(fd)

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise CredentialError(f"{self.path} cannot be read: {exc}") from None
        except RecursionError:  # json recurses once per level: a damaged file, all the same
            raise CredentialError(f"{self.path} cannot be read: nested too deeply") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise CredentialError(f"{self.path}: unknown credentials file format")
        devices = data.get("devices")
        if not isinstance(devices, dict):
            raise CredentialError(f"{self.path}: the devices are not a map of id to hash")
        for twin_id, entry in devices.items():
            problem = _entry_problem(twin_id, entry)
            if problem is not None:
                raise CredentialError(f"{self.path}: device {twin_id!r}: {problem}")
        return devices

    def _save(self, devices: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": _FORMAT, "devices": devices}, indent=2)
        _write_private({self.path: text})


def _entry_problem(twin_id: str, entry: object) -> str | None:
    """Why one device of the file cannot be used, or None.

    Checked on every load: an entry without ``created`` crashed ``devices list``, and one
    with an id ``devices add`` refuses (a '/' or a wildcard) went into the mosquitto ACL.
    """
    problem = _id_problem(twin_id)
    if problem is not None:
        return problem
    if not isinstance(entry, dict):
        return "not an object of hash, created and rotated"
    hash_ = entry.get("hash")
    if not isinstance(hash_, str) or not _is_hash(hash_):
        return "'hash' is missing or not a $7$ password hash"
    # Printed by `devices list`: a lone surrogate (JSON "\udc00") ended it in a traceback.
    created, rotated = entry.get("created"), entry.get("rotated")
    if not isinstance(created, str) or not _is_time(created):
        return "'created' is missing or not a time"
    if rotated is not None and not (isinstance(rotated, str) and _is_time(rotated)):
        return "'rotated' is neither a time nor null"
    return None


# The embedded broker loads the whole file at every login: remembering which ids and hashes
# passed keeps that load close to the cost of parsing the JSON (10,000 devices: parsing
# 15 ms; checking every entry afresh 45 ms more, with these caches about 10 ms).
@functools.lru_cache(maxsize=1 << 16)
def _id_problem(twin_id: str) -> str | None:
    try:
        _check_device_id(twin_id)
    except CredentialError as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=1 << 16)
def _is_hash(encoded: str) -> bool:
    return _parse_hash(encoded) is not None


@functools.lru_cache(maxsize=1 << 16)
def _is_time(text: str) -> bool:
    # Printable ASCII first: Python 3.11's fromisoformat takes any one character between the
    # date and the time (a lone surrogate, a newline), which `devices list` then printed.
    if not (text.isascii() and text.isprintable()):
        return False
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def render_acl(service_user: str, layout: TopicLayout, twin_ids: Iterable[str]) -> str:
    """The mosquitto ACL text: everything for the service user; for each device, reading
    its own subtree and writing the topics the service reads there, as the embedded broker
    allows (:func:`connectivity.broker.device_may_publish`)."""
    out = ["# Generated by `twin-service devices export-mosquitto`; do not edit.", ""]
    out += [f"user {service_user}", "topic readwrite #", ""]
    for twin_id in twin_ids:
        out += [f"user {mqtt_username(twin_id)}", f"topic read {layout.base(twin_id)}/#"]
        out += [f"topic write {layout.topic(twin_id, suffix)}" for suffix in INBOUND]
        out.append("")
    return "\n".join(out)


def _write_private(files: dict[Path, str]) -> None:
    """Replace each path of ``files`` with its text: a new file only its owner can read, or
    one with the owner, group and mode of the file it replaces (:func:`_keep_owner_and_mode`).

    Every text is written (and synced) beside its path before any is renamed: a path that
    cannot be written leaves all of them as they were. The password file used to be
    replaced before an ACL in a missing directory failed, mosquitto then reloading new
    passwords with the old ACL, and the error named the temporary file.
    """
    written: list[tuple[Path, Path]] = []
    try:
        for path, text in files.items():
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            try:
                if path.is_dir():  # found now, not once the other files are replaced
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                written.append((tmp, path))
                _keep_owner_and_mode(fd, path)
                with os.fdopen(fd, "w") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                raise CredentialError(f"cannot write {path}: {exc.strerror or exc}") from None
        for tmp, path in written:
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise CredentialError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        for tmp, _ in written:  # left only by a failure: the renamed are gone
            tmp.unlink(missing_ok=True)


def _keep_owner_and_mode(fd: int, path: Path) -> None:
    """Give the new file ``fd`` of ``path`` the owner, group and permissions of the file it
    replaces, if any.

    mosquitto drops from root to its own user before it reads its files, so the admin makes
    them readable to it once; an export as root (needed to write in /etc/mosquitto) replaced
    them with root's 0600 files, and the next SIGHUP shut every device out. A user who may
    replace the file but not give the new one its owner (only root may give a file away)
    is refused: the broker could not read what it would write.
    """
    try:
        old = os.stat(path)
    except FileNotFoundError:
        return
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        raise CredentialError(
            f"cannot write {path}: it belongs to {_user_name(old.st_uid)}:"
            f"{_group_name(old.st_gid)}, and this user cannot give the new file that owner; "
            "run as root or as its owner"
        ) from None
    os.fchmod(fd, stat.S_IMODE(old.st_mode) & 0o777)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
