"""Strict parsing of the numbers in option values, as OVSDB holds them (strings).

Python's `int()` and `float()` accept much that no operator means: digits of any script
(Arabic-Indic digits one, zero, zero, zero, zero are 10000), underscores ('1_000'),
surrounding whitespace, 'inf' and 'nan'. An option is a number only when it is ASCII:
decimal digits, or `0x` and hexadecimal digits where hex is allowed. Imports nothing of
espswitch, so every layer can use it.
"""

from __future__ import annotations

import re

_DEC = re.compile(r"[0-9]+")
_HEX = re.compile(r"0[xX][0-9a-fA-F]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_uint(text: str, *, hex_ok: bool = True) -> int | None:
    """The non-negative integer `text` spells (decimal, or 0x hex if `hex_ok`), else None."""
    text = text.strip(" ")
    if _DEC.fullmatch(text):
        return int(text, 10)
    if hex_ok and _HEX.fullmatch(text):
        return int(text, 16)
    return None


def parse_udecimal(text: str) -> float | None:
    """The non-negative decimal number `text` spells ('30', '0.5'), else None."""
    text = text.strip(" ")
    return float(text) if _DECIMAL.fullmatch(text) else None
