"""Byte sizes as people write them ("10GiB", "512MB", "1.5G")."""

from __future__ import annotations

import argparse
import re

UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


def parse_bytes(text) -> int:
    """Parse '10GiB', '512MB', '1.5G' or a plain integer into bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a size: write e.g. 10GiB, 512MiB, 8GB or 1073741824"
        )
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def parse_positive_bytes(text) -> int:
    """parse_bytes for sizes that must hold something (--shard-size): at least 1 byte."""
    value = parse_bytes(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, such as 2GiB; got {text!r}")
    return value


def parse_budget(text) -> int:
    """Like parse_bytes, for budgets where a bare number is ambiguous: "1.5" meant 1.5 GB,
    not 1 byte. Integers given from Python stay bytes; text needs a unit."""
    if isinstance(text, int) or not re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*", str(text)):
        return parse_bytes(text)
    if float(text) <= 1:
        raise argparse.ArgumentTypeError(
            f"{str(text).strip()} leaves no memory for weights: give a size such as 4GiB, a "
            "share of free memory in (0, 1] such as 0.8, or 'unbounded'")
    raise argparse.ArgumentTypeError(
        f"a bare number above 1 needs a unit: write {str(text).strip()}GiB or "
        f"{str(text).strip()}GB (a number up to 1, such as 0.8, is a share of free memory)")


def format_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{int(nbytes)} B" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} GiB"
