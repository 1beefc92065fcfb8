"""Tests for parsing sizes people write and formatting byte counts for them."""

from __future__ import annotations

import pytest

from multicloud.core.errors import ConfigError
from multicloud.core.units import format_bytes, parse_size

KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("12B", 12),
        ("64KiB", 64 * KIB),
        ("500MiB", 500 * MIB),
        ("1GiB", GIB),
        ("2TiB", 2 * TIB),
        ("10KB", 10_000),
        ("10MB", 10_000_000),
        ("1.5GB", 1_500_000_000),
        ("3TB", 3 * 10**12),
        ("1.5KiB", 1536),
        ("0.5MiB", MIB // 2),
        (".5KB", 500),
        ("0.3KiB", 307),  # fractions of a unit round down to whole bytes
        ("1gib", GIB),
        ("1GIB", GIB),
        ("10 mb", 10_000_000),
        ("  2 GiB\n", 2 * GIB),
        ("+7", 7),
    ],
)
def test_parse_size_accepts(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "   ", "abc", "GiB", "1..5GB", "1,5GB", "1e3", "nan", "inf", "1 G i B", "١٢", "0x10"],
)
def test_parse_size_rejects_garbage_naming_the_value(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid size") as info:
        parse_size(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["-1", "-1GiB", "-0.5 MB"])
def test_parse_size_rejects_negative_sizes(text: str) -> None:
    with pytest.raises(ConfigError, match="cannot be negative"):
        parse_size(text)


@pytest.mark.parametrize("text", ["1XB", "5 G", "10 kibibytes"])
def test_parse_size_unknown_unit_lists_the_valid_ones(text: str) -> None:
    with pytest.raises(ConfigError, match="unknown unit") as info:
        parse_size(text)
    assert "KiB" in str(info.value)
    assert "GB" in str(info.value)


@pytest.mark.parametrize("text", ["1.5", "2.5B"])
def test_parse_size_rejects_fractional_bytes(text: str) -> None:
    with pytest.raises(ConfigError, match="whole number"):
        parse_size(text)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (12, "12 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (512 * MIB, "512.0 MiB"),
        (GIB, "1.0 GiB"),
        (3 * TIB // 2, "1.5 TiB"),
        (MIB - 1, "1.0 MiB"),  # would otherwise read "1024.0 KiB"
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_bytes(n: int, expected: str) -> None:
    assert format_bytes(n) == expected


@pytest.mark.parametrize("n", [0, 12, KIB, 64 * KIB, 500 * MIB, GIB, 2 * TIB])
def test_format_then_parse_round_trips_whole_units(n: int) -> None:
    assert parse_size(format_bytes(n)) == n
