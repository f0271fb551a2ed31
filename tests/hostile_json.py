"""Random JSON values for the seeded hostile-input tests (REST, WebSocket and MQTT).

The shape is shared: scalars, objects and arrays nested at most a few levels, with now and
then an empty container. Each test brings its own keys, texts and numbers, the part that
aims at what its transport must refuse.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class JsonValues:
    rng: random.Random
    key: Callable[[], str]
    text: Callable[[], str]
    numbers: Sequence[Any]

    def value(self, depth: int = 0) -> Any:
        kind = self.rng.randint(0, 9 if depth < 4 else 3)
        if kind == 0:
            return None
        if kind == 1:
            return self.rng.choice([True, False])
        if kind == 2:
            return self.rng.choice(self.numbers)
        if kind == 3:
            return self.text()
        if kind <= 6:
            return self.object(depth + 1)
        if kind <= 8:
            return [self.value(depth + 1) for _ in range(self.rng.randint(0, 4))]
        return self.rng.choice([{}, [], ""])

    def object(self, depth: int = 0) -> dict[str, Any]:
        return {self.key(): self.value(depth) for _ in range(self.rng.randint(0, 4))}
