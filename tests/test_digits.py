"""Decimal text as numbers (pure, no service)."""

from __future__ import annotations

import pytest

from twin_service.digits import ascii_decimal, ascii_integer


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("3", 3), ("007", 7), ("9" * 4300, int("9" * 4300))],
)
def test_integers(text: str, value: int) -> None:
    assert ascii_integer(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0.0),
        ("1", 1.0),
        ("0.5", 0.5),
        ("007.250", 7.25),
        ("1." + "0" * 5000, 1.0),
        ("9" * 400, float("inf")),  # past a float: the caller's bound refuses it
    ],
)
def test_decimals(text: str, value: float) -> None:
    assert ascii_decimal(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        "1.",
        ".5",
        "1.2.3",
        "1_0",
        "+1",
        "-1",
        " 1",
        "1 ",
        "1e2",
        "1E2",
        "nan",
        "inf",
        "0x1",
        "\u0661",
        "\uff11",
        "1.\u0665",
        "\xb2",
        "1,5",
    ],
)
def test_not_decimals(text: str) -> None:
    assert ascii_decimal(text) is None
