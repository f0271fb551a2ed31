"""Which delta a device app is handed once the twin fetched on a (re)connection answers."""

from __future__ import annotations

from typing import Any

import pytest

from connectivity.device_deltas import DeltaMessage, delta_after_get, fetch_again


def _d(x: int, version: int) -> dict[str, Any]:
    return {"state": {"x": x}, "desiredVersion": version}


def _twin(version: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"desired": {"x": 9}, "reported": {}, "delta": delta, "desiredVersion": version}


CLEARED = None


@pytest.mark.parametrize(
    ("held", "twin", "handed"),
    [
        # The replayed queue ends cleared, the twin has no delta: nothing (the defect handed
        # the first of the queue to an app already waiting).
        ([_d(1, 2), _d(2, 3), _d(3, 4), CLEARED], _twin(4, {}), None),
        # Withdrawn, yet the cleared delta has not come before the answer: still nothing.
        ([_d(1, 2), _d(2, 3)], _twin(4, {}), None),
        # The twin's delta, once, whatever was replayed before it.
        ([_d(1, 2), _d(3, 4), _d(3, 4)], _twin(4, {"x": 3}), _d(3, 4)),
        ([], _twin(4, {"x": 3}), _d(3, 4)),
        # Same version, other state (reported moved since): the answer is the newer word.
        ([{"state": {"x": 3, "y": 1}, "desiredVersion": 4}], _twin(4, {"x": 3}), _d(3, 4)),
        ([], _twin(4, {}), None),
        # A delta for a newer desired version overtook the answer: it stands, and so does
        # what came after it.
        ([_d(1, 2), _d(5, 5)], _twin(4, {"x": 3}), _d(5, 5)),
        ([_d(5, 5), _d(6, 6)], _twin(4, {}), _d(6, 6)),
        ([_d(5, 5), CLEARED], _twin(4, {"x": 3}), None),
        ([_d(5, 5), CLEARED, _d(6, 6)], _twin(4, {"x": 3}), _d(6, 6)),
        # A cleared delta held before a twin fetched again (fetch_again): that answer was
        # read after the cleared delta's commit, so it decides.
        ([_d(1, 2), CLEARED], _twin(3, {}), None),
        ([_d(1, 2), CLEARED], _twin(4, {"x": 2}), _d(2, 4)),
        # No answer (the get failed): the last message held.
        ([_d(1, 2), _d(2, 3)], None, _d(2, 3)),
        ([_d(1, 2), CLEARED], None, None),
        ([], None, None),
    ],
)
def test_delta_after_get(
    held: list[DeltaMessage], twin: dict[str, Any] | None, handed: DeltaMessage
) -> None:
    assert delta_after_get(held, twin) == handed


@pytest.mark.parametrize(
    ("held", "twin", "again"),
    [
        # A cleared delta came before the answer, which has a delta: the service may have
        # withdrawn it after reading the twin (an operator reverted desired), and a cleared
        # message carries no desiredVersion to tell. The defect handed {x: 1} to the app
        # while the twin had desiredVersion 3 and no delta.
        ([_d(1, 2), CLEARED], _twin(2, {"x": 1}), True),
        ([CLEARED], _twin(2, {"x": 1}), True),
        ([CLEARED, _d(1, 2)], _twin(2, {"x": 1}), True),
        # Decided: no cleared delta, the answer has none, or a later one overtook the answer.
        ([_d(1, 2)], _twin(2, {"x": 1}), False),
        ([_d(1, 2), CLEARED], _twin(2, {}), False),
        ([_d(5, 5), CLEARED], _twin(4, {"x": 3}), False),
        ([CLEARED, _d(5, 5)], _twin(4, {"x": 3}), False),
        # No answer: the last message held decides (a cleared one last: nothing).
        ([_d(1, 2), CLEARED], None, False),
        ([], _twin(2, {"x": 1}), False),
    ],
)
def test_fetch_again_when_a_cleared_delta_may_be_later_than_the_answer(
    held: list[DeltaMessage], twin: dict[str, Any] | None, again: bool
) -> None:
    assert fetch_again(held, twin) is again
