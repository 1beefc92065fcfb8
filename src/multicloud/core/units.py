"""Byte sizes as people write them ("1GiB", "500MB") and as we show them ("1.0 GiB"),
and file names as we show them.

Paths are `str` everywhere, and a name that is not valid UTF-8 keeps its bytes as surrogate
escapes (what `os.fsdecode` and `os.scandir` give), so the file system calls and the
manifest get it back exactly. Such a string cannot be written to a UTF-8 terminal, log or
JSON document as it is (`UnicodeEncodeError`); `display_path` is the form to show instead.
"""

from __future__ import annotations

import re
from decimal import Decimal

from multicloud.core.errors import ConfigError

__all__ = ["display_path", "format_bytes", "is_utf8", "parse_size"]

# Binary units are powers of 1024, decimal ones powers of 1000, as in IEC 80000-13.
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_VALID_UNITS = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (case-insensitive), or none for bytes"
_SIZE = re.compile(
    r"\s*(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(?P<unit>[a-z]*)\s*", re.I | re.ASCII
)

_FORMAT_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def parse_size(text: str) -> int:
    """Return the number of bytes in a size such as "1GiB", "1.5 GB", "64KiB" or "4096"."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ConfigError(
            f"invalid size {text!r}: expected a number with an optional unit "
            f"({_VALID_UNITS}), e.g. '500MiB' or '1.5GB'"
        )
    unit = match["unit"].lower()
    if unit not in _UNITS:
        raise ConfigError(
            f"invalid size {text!r}: unknown unit {match['unit']!r}; use {_VALID_UNITS}"
        )
    number = Decimal(match["number"])  # the regex admits only what Decimal parses
    if number < 0:
        raise ConfigError(f"invalid size {text!r}: a size cannot be negative; use 0 or more")
    scale = _UNITS[unit]
    total = number * scale
    # A byte count itself must be whole; a fraction of a larger unit rounds down to whole bytes
    # ("0.3KiB" is 307 bytes), which is what a reader of "1.5GB" expects.
    if scale == 1 and total != total.to_integral_value():
        raise ConfigError(
            f"invalid size {text!r}: a byte count must be a whole number; "
            f"use a larger unit for fractions, e.g. '1.5KiB'"
        )
    return int(total)


def format_bytes(n: int) -> str:
    """Return a byte count for people: "12 B" below 1 KiB, else one decimal in binary units."""
    if n < 0:
        return "-" + format_bytes(-n)
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in _FORMAT_UNITS[:-1]:
        # Move up while the rounded figure would read 1024.0 or more ("1024.0 KiB" is "1.0 MiB").
        if round(value, 1) < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {_FORMAT_UNITS[-1]}"


# C0 and C1 controls and DEL: a name holding one could move the cursor, clear the screen
# or break a one-line view, so it is shown as an escape, as `ls -b` does.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def display_path(name: str) -> str:
    """name for a terminal or a log: b"bad\\xff" reads "bad\\\\xff", never a crash."""
    if name.isascii() and name.isprintable():
        return name  # the common case, at the cost of two C-level scans
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte (from JSON)
        text = name.encode("utf-8", "backslashreplace").decode("utf-8")
    else:
        text = raw.decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def is_utf8(text: str) -> bool:
    """Whether text encodes to UTF-8 as it is (no surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
