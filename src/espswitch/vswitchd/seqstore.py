"""Durable sequence-number marks of manually keyed SAs (see datapath.protection.SeqMarks).

The marks live in `$OVS_DBDIR/espswitchd.seq`, next to the database, as JSON: for each SA the
peer's address, the SPI, the transform and the first sequence number to use. No key
material. A file written before marks named the peer (interface name -> SPI, transform,
number) is read as marks for any peer. The file is replaced
atomically (write, fsync, rename) so a crash leaves the old marks or the new ones.
"""

from __future__ import annotations

import json
import os

from espswitch.datapath.protection import ANY_PEER, SaKey, SeqMarks

FILENAME = "espswitchd.seq"
RETRY = 5.0  # seconds before a failed write is tried again


class SeqStore:
    """Loads the marks once, and writes them whenever the datapath reserved more."""

    def __init__(self, path: str, log_warn) -> None:
        self.path = path
        self.warn = log_warn
        self.next_try = 0.0
        self.last_error: str | None = None
        self.marks = SeqMarks(self._load())

    def _load(self) -> dict[SaKey, int]:
        try:
            with open(self.path) as f:
                doc = json.load(f)
            marks: dict[SaKey, int] = {}
            if "sas" in doc:
                for peer, spi, esp, seq in doc["sas"]:
                    marks[(str(peer), int(spi), str(esp))] = int(seq)
            else:  # the first format: interface name -> (SPI, transform, number)
                for spi, esp, seq in doc["marks"].values():
                    key = (ANY_PEER, int(spi), str(esp))
                    marks[key] = max(marks.get(key, 0), int(seq))
            return marks
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            # The marks only avoid a replay-window stall after a restart: start without them.
            self.warn(f"{self.path}: unreadable sequence marks ignored ({e.__class__.__name__})")
            return {}

    def save(self, now: float) -> None:
        """Write the marks if they changed (and the last failure is RETRY seconds old)."""
        if not self.marks.dirty or now < self.next_try:
            return
        tmp = f"{self.path}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"sas": [[*k, v] for k, v in self.marks.marks.items()]}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            self.next_try = now + RETRY
            error = f"cannot store sequence marks in {self.path}: {e.strerror}"
            if error != self.last_error:  # once, not every RETRY seconds
                self.warn(error + " (retrying)")
                self.last_error = error
            return
        if self.last_error is not None:
            self.warn(f"sequence marks stored in {self.path} again")
            self.last_error = None
        self.marks.dirty = False
