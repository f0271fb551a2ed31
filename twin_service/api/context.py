"""What the routes share: settings, store, service, tokens. Built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from twin_service.auth import TokenRegistry
from twin_service.index.base import SearchIndex
from twin_service.service import TwinService
from twin_service.settings import Settings
from twin_service.store.base import TwinStore
from twin_service.streams.hub import EventHub


@dataclass
class AppContext:
    settings: Settings
    store: TwinStore
    service: TwinService
    tokens: TokenRegistry
    index: SearchIndex
    hub: EventHub
    #: Extra readiness checks (broker, index) added by the components that own them.
    readiness: dict[str, Any] = field(default_factory=dict)
    #: Components started with the app (MQTT bridge, event hub...), keyed by name.
    components: dict[str, Any] = field(default_factory=dict)


class Component(Protocol):
    """Something started with the app and stopped with it (MQTT bridge, event hub...)."""

    async def start(self, ctx: AppContext) -> None: ...

    async def stop(self) -> None: ...
