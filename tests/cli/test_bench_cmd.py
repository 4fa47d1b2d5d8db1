"""`espswitch bench`: the contract's benchmark command runs and writes its JSON."""

from __future__ import annotations

import json
import subprocess


def test_bench_esp_quick_writes_ratios_for_every_aead(tmp_path) -> None:
    out = tmp_path / "esp.json"
    r = subprocess.run(["espswitch", "bench", "esp", "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["results"]
    assert {(x["transform"], x["size"]) for x in rows} >= {
        ("aes128gcm16", 1400), ("aes256gcm16", 64), ("chacha20poly1305", 512)}
    assert all(x["ours_pps"] > 0 and x["bare_aead_pps"] > 0 and x["framing_pps"] > 0
               for x in rows)


def test_bench_with_an_unknown_name_is_one_line_exit_2() -> None:
    r = subprocess.run(["espswitch", "bench", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
