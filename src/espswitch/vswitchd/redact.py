"""Keeps secrets out of espswitchd's log, whatever logs them.

The OVS Python library logs whole JSON-RPC messages at debug level (module `jsonrpc`), and
database updates carry the `options` of interfaces: with `ovs-appctl vlog/set dbg`, manual
keys and pre-shared keys would reach the log file. A filter on the logging destinations
that `ovs.vlog` writes to replaces the value of every secret option before it is written.
"""

from __future__ import annotations

import logging
import re

SECRET_OPTIONS = ("esp_key_in", "esp_key_out", "psk")
HIDDEN = "<hidden>"
_NAMES = "|".join(SECRET_OPTIONS)
# JSON: ["esp_key_in","00ab..."] in OVSDB maps (escaped quotes inside the string included).
_JSON_PAIR = re.compile(rf'("(?:{_NAMES})"\s*,\s*)"(?:[^"\\]|\\.)*"')
# Text: psk=..., 'psk': '...', options:psk=...
_KEY_VALUE = re.compile(rf"""\b({_NAMES})(["']?\s*[=:]\s*)("[^"]*"|'[^']*'|[^\s,}}\]]+)""")


def redact(text: str) -> str:
    """`text` with the value of every secret option replaced by <hidden>."""
    if not any(name in text for name in SECRET_OPTIONS):
        return text
    text = _JSON_PAIR.sub(rf'\1"{HIDDEN}"', text)
    return _KEY_VALUE.sub(rf"\1\2{HIDDEN}", text)


class RedactFilter(logging.Filter):
    """A logging filter that rewrites each record's message with `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean is not msg:
            record.msg, record.args = clean, None
        return True


def install() -> None:
    """Filter every destination `ovs.vlog` logs to (it names its loggers after them)."""
    for name in ("console", "file", "syslog"):
        logging.getLogger(name).addFilter(RedactFilter())
