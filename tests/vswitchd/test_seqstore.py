"""The daemon's durable store of sequence-number marks ($OVS_DBDIR/espswitchd.seq)."""

from __future__ import annotations

import json
import os

from espswitch.datapath.protection import SEQ_RESERVE
from espswitch.ipsec import OutboundSA, SaParams, parse_transform
from espswitch.vswitchd.seqstore import SeqStore

KEY = bytes(range(20))


def params() -> SaParams:
    return SaParams(spi=0x1001, transform=parse_transform("aes128gcm16"), keymat=KEY)


def test_store_round_trip_is_private_and_keyless(tmp_path):
    path = str(tmp_path / "espswitchd.seq")
    warnings: list[str] = []
    store = SeqStore(path, warnings.append)
    sa = OutboundSA(params())
    store.marks.track("192.0.2.2", sa)
    store.save(0.0)
    assert not store.marks.dirty and warnings == []
    assert os.stat(path).st_mode & 0o777 == 0o600
    with open(path) as f:
        text = f.read()
    assert KEY.hex() not in text
    assert json.loads(text)["sas"][0][:3] == ["192.0.2.2", 0x1001, "aes128gcm16"]
    again = SeqStore(path, warnings.append)
    assert again.marks.start_for("192.0.2.2", sa.params) == 1 + SEQ_RESERVE


def test_a_corrupt_or_unwritable_store_is_a_warning_not_a_failure(tmp_path):
    path = tmp_path / "espswitchd.seq"
    path.write_text("{not json")
    warnings: list[str] = []
    store = SeqStore(str(path), warnings.append)
    assert store.marks.marks == {} and len(warnings) == 1 and "ignored" in warnings[0]
    blocked = SeqStore(str(tmp_path / "no" / "such" / "dir" / "f"), warnings.append)
    blocked.marks.track("192.0.2.2", OutboundSA(params()))
    blocked.save(10.0)
    assert blocked.marks.dirty and "cannot store" in warnings[-1]
    n = len(warnings)
    blocked.save(11.0)  # not retried before RETRY seconds
    blocked.marks.track("192.0.2.3", OutboundSA(params()))
    blocked.save(20.0)  # retried, failing the same way: not said again
    assert len(warnings) == n and blocked.marks.dirty


def test_marks_of_the_first_format_apply_to_any_peer(tmp_path):
    path = tmp_path / "espswitchd.seq"
    path.write_text(json.dumps({"marks": {"tun0": [0x1001, "aes128gcm16", 77777]}}))
    store = SeqStore(str(path), [].append)
    assert store.marks.start_for("198.51.100.9", params()) == 77777
