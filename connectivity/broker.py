"""The embedded MQTT broker (amqtt, in process, on the service's event loop).

For the zero-config default only; production should run mosquitto (see
:meth:`connectivity.credentials.CredentialStore.write_mosquitto_files`). amqtt 0.12 speaks
MQTT 3.1.1 only, so clients of this broker must use ``protocol=4``.

Access rules, enforced by the two plugins below:

* the service account (username and password from the configuration) may use every topic;
* a device logs in with its twin id (or :func:`~connectivity.credentials.mqtt_username` of it)
  and the password from the credential store, and may publish, subscribe and receive only under
  its own twin's topic prefix;
* anonymous clients are refused unless ``allow_anonymous`` is set (then they may do anything).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.errors import BrokerError
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from connectivity.credentials import CredentialError, CredentialStore, twin_id_from_username
from connectivity.errors import MqttUnavailable
from connectivity.topics import DEFAULT_PREFIX, TopicLayout

log = logging.getLogger(__name__)


def _without_traceback(record: logging.LogRecord) -> bool:
    record.exc_info = record.exc_text = None
    return True


@dataclass(frozen=True)
class EmbeddedBrokerConfig:
    """Where the embedded broker listens and whom it lets in."""

    service_username: str
    service_password: str = field(repr=False)
    credentials_path: Path
    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = DEFAULT_PREFIX
    allow_anonymous: bool = False
    #: Seconds an offline persistent session (and its queued QoS 1 messages) is kept.
    session_expiry: int | None = 7 * 24 * 3600


@dataclass
class _PluginConfig:
    service_username: str = ""
    service_password: str = ""
    credentials_path: str = ""
    topic_prefix: str = DEFAULT_PREFIX
    allow_anonymous: bool = False


class TwinAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
    """amqtt authentication: service account, device credentials, optional anonymous."""

    Config = _PluginConfig

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._cfg: _PluginConfig = self.config
        self._store = CredentialStore(Path(self._cfg.credentials_path))

    async def authenticate(self, *, session: Session) -> bool | None:
        username, password = session.username, session.password or ""
        if not username:
            return self._cfg.allow_anonymous
        if username == self._cfg.service_username:
            return hmac.compare_digest(password.encode(), self._cfg.service_password.encode())
        # Reads the file and runs PBKDF2: keep both off the event loop.
        try:
            ok = await asyncio.to_thread(self._store.verify, username, password)
        except CredentialError as exc:  # a damaged file refuses every device, loudly
            log.error("embedded broker refused login for %r: %s", username, exc)
            return False
        if not ok:
            log.info("embedded broker refused login for %r", username)
        return ok


class TwinTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt is untyped
    """amqtt topic ACL: a device stays inside its own twin's topics."""

    Config = _PluginConfig

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._cfg: _PluginConfig = self.config
        self._layout = TopicLayout(self._cfg.topic_prefix)

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        if session is None or topic is None:
            return False
        username = session.username
        if not username:
            return self._cfg.allow_anonymous
        if username == self._cfg.service_username:
            return True
        return device_may_use(self._layout, twin_id_from_username(username), topic)


def device_may_use(layout: TopicLayout, twin_id: str, topic: str) -> bool:
    """Whether a device may publish/subscribe/receive ``topic`` (a name or a filter)."""
    try:
        base = layout.base(twin_id)
    except ValueError:
        return False
    return topic.startswith(base + "/")


class EmbeddedBroker:
    """An amqtt broker running on the current event loop."""

    def __init__(self, config: EmbeddedBrokerConfig) -> None:
        self.config = config
        self._broker: Broker | None = None

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the listener (without credentials)."""
        return f"mqtt://{self.config.host}:{self.config.port}"

    async def start(self) -> None:
        """Bind the listener and start accepting clients."""
        if self._broker is not None:
            raise RuntimeError("embedded broker already started")
        cfg = self.config
        plugin_cfg: dict[str, Any] = {
            "service_username": cfg.service_username,
            "service_password": cfg.service_password,
            "credentials_path": str(cfg.credentials_path),
            "topic_prefix": cfg.topic_prefix,
            "allow_anonymous": cfg.allow_anonymous,
        }
        broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{cfg.host}:{cfg.port}"}},
                "session_expiry_interval": cfg.session_expiry,
                "plugins": {
                    f"{__name__}.TwinAuthPlugin": plugin_cfg,
                    f"{__name__}.TwinTopicPlugin": plugin_cfg,
                },
            }
        )
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.addFilter(_without_traceback)  # the reason is in the error raised below
        try:
            await broker.start()
        except BrokerError as exc:  # the port taken, an address not of this host...
            reason = exc.__cause__ or exc
            raise MqttUnavailable(f"The embedded MQTT broker cannot start: {reason}") from exc
        finally:
            amqtt_log.removeFilter(_without_traceback)
        self._broker = broker

    async def stop(self) -> None:
        """Close every connection and the listener. Sessions and retained messages are lost."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    @property
    def ready(self) -> bool:
        """True once started and listening (amqtt binds its listeners inside ``start``)."""
        return self._broker is not None and self._broker.transitions.state == "started"
