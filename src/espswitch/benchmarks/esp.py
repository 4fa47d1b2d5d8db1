"""Benchmark of the ESP engine: round trips per second against the bare AEAD and scapy.

For payloads of 64, 512 and 1400 bytes and each AEAD transform (aes128gcm16, aes256gcm16,
chacha20poly1305) it measures, in one process on one core:

- ours: `OutboundSA.encrypt` then `InboundSA.decrypt` of the same packet (replay window 1024),
  i.e. one ESP encrypt+decrypt round trip through the datapath's engine;
- bare_aead: `cryptography`'s AEAD encrypt then decrypt of a plaintext of the same length
  with a precomputed nonce and AAD: the floor that no Python ESP code can beat;
- framing: the bare AEAD plus only the byte work every ESP packet needs (pack SPI, sequence
  number and IV; nonce = salt + IV; append the trailer; prepend the header; on receipt read
  the sequence number, cut nonce, AAD and ciphertext, check the padding, cut the trailer),
  without replay window, counters, lifetimes or error handling: what the same Python costs
  before the engine does any of its own checks, so "ours / framing" is the engine's share;
- scapy: `SecurityAssociation.encrypt` then `.decrypt` of an IPv4 packet carrying the payload
  (an independent implementation; slow, so it runs for a short fixed time);
- compiled: the fast path's compiled SAs (`espswitch.datapath.fast`, issue 10),
  `encrypt` then `open` one packet per call, as the Python datapath calls them;
- compiled_batch: the same through `seal_batch` then `open_batch`, 32 packets per call,
  the GIL released around each batch (what the ring pipeline will call);
- bare_evp: OpenSSL EVP encrypt then decrypt of the same plaintext in a C loop, one
  context per direction made once, no ESP at all: the honest floor for compiled code.
  (The compiled figures are 0 when the module is not built.)

All loops of one row are measured in alternation for a few rounds and the best of each is
kept, so that noise from the machine affects both alike. For 1400-byte aes128gcm16 it also
prints each direction alone (encrypt only, decrypt only) against the bare AEAD, for whoever
optimises the engine. Nothing asserts timings: this is a benchmark, not a test.

Run:  python3 bench/esp.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from espswitch.datapath import fast
from espswitch.ipsec import InboundSA, OutboundSA, SaParams, parse_transform

TRANSFORMS = ("aes128gcm16", "aes256gcm16", "chacha20poly1305")
SIZES = (64, 512, 1400)
SPI = 0x1000
NH_UDP = 17


def _keymat(transform: str) -> bytes:
    return bytes(range(1, parse_transform(transform).keymat_len + 1))


def _time_rate(loop: Callable[[int], None], n: int) -> float:
    """Run `loop(n)` once and return iterations per second."""
    t0 = time.perf_counter()
    loop(n)
    return n / (time.perf_counter() - t0)


def _calibrate(loop: Callable[[int], None], seconds: float) -> int:
    """How many iterations of `loop` take about `seconds`."""
    n = 16
    while True:
        t0 = time.perf_counter()
        loop(n)
        dt = time.perf_counter() - t0
        if dt >= 0.02:
            return max(16, int(n * seconds / dt))
        n *= 4


def best_interleaved(loops: dict[str, Callable[[int], None]], rounds: int,
                     seconds: float) -> dict[str, float]:
    """Run each loop for ~`seconds`, in turn, `rounds` times; return each one's best rate."""
    sizes = {name: _calibrate(loop, seconds) for name, loop in loops.items()}
    best = dict.fromkeys(loops, 0.0)
    for _ in range(rounds):
        for name, loop in loops.items():
            best[name] = max(best[name], _time_rate(loop, sizes[name]))
    return best


# -- the loops -----------------------------------------------------------------------------


def _params(transform: str) -> SaParams:
    return SaParams(spi=SPI, transform=parse_transform(transform), keymat=_keymat(transform),
                    replay_window=1024)


def _bare_aead(transform: str) -> tuple[AESGCM | ChaCha20Poly1305, bytes, bytes]:
    """The AEAD object of the transform, a nonce (salt + IV) and the ESP AAD (SPI, seq)."""
    t = parse_transform(transform)
    key = _keymat(transform)
    enc_key, salt = key[: t.enc_key_len], key[t.enc_key_len : t.enc_key_len + t.salt_len]
    aead = AESGCM(enc_key) if t.cipher == "aes-gcm" else ChaCha20Poly1305(enc_key)
    return aead, salt + struct.pack("!Q", 1), struct.pack("!II", SPI, 1)


def _esp_plaintext_len(size: int) -> int:
    # What ESP encrypts: payload, padding to 4 bytes, pad length, next header.
    return size + (-(size + 2) % 4) + 2


def ours_round_trip(transform: str, size: int) -> Callable[[int], None]:
    out, inb = OutboundSA(_params(transform)), InboundSA(_params(transform))
    payload = os.urandom(size)
    encrypt, decrypt = out.encrypt, inb.decrypt

    def loop(n: int) -> None:
        for _ in range(n):
            decrypt(encrypt(payload, NH_UDP))

    return loop


def bare_round_trip(transform: str, size: int) -> Callable[[int], None]:
    aead, nonce, aad = _bare_aead(transform)
    plain = os.urandom(_esp_plaintext_len(size))
    encrypt, decrypt = aead.encrypt, aead.decrypt

    def loop(n: int) -> None:
        for _ in range(n):
            decrypt(nonce, encrypt(nonce, plain, aad), aad)

    return loop


def framing_round_trip(transform: str, size: int) -> Callable[[int], None]:
    """The bare AEAD plus ESP's unavoidable byte work and nothing else (see the docstring)."""
    aead, _nonce, _aad = _bare_aead(transform)
    salt = _keymat(transform)[parse_transform(transform).enc_key_len :][:4]
    payload = os.urandom(size)
    pad_len = -(size + 2) % 4
    padding = bytes(range(1, pad_len + 1))
    trailer = padding + bytes((pad_len, NH_UDP))
    encrypt, decrypt = aead.encrypt, aead.decrypt
    spi_seq_iv, seq_of = struct.Struct("!IIQ").pack, struct.Struct("!I").unpack_from

    def loop(n: int) -> None:
        for seq in range(1, n + 1):
            hdr = spi_seq_iv(SPI, seq, seq)
            esp = hdr + encrypt(salt + hdr[8:], payload + trailer, hdr[:8])
            seq_of(esp, 4)
            pt = decrypt(salt + esp[8:16], esp[16:], esp[:8])
            pad = pt[-2]
            end = len(pt) - 2 - pad
            pt.endswith(padding, 0, end + pad)
            pt[:end]

    return loop


def compiled_round_trip(transform: str, size: int) -> Callable[[int], None]:
    """The compiled SAs, one packet per call (`encrypt`, then `open` as the datapath)."""
    out = fast.make_outbound_sa(_params(transform))
    inb = fast.make_inbound_sa(_params(transform))
    payload = os.urandom(size)
    encrypt, open_ = out.encrypt, inb.open

    def loop(n: int) -> None:
        for _ in range(n):
            open_(encrypt(payload, NH_UDP))

    return loop


BATCH = 32


def compiled_batch_round_trip(transform: str, size: int) -> Callable[[int], None]:
    """The compiled SAs, BATCH packets per call through seal_batch and open_batch."""
    out = fast.make_outbound_sa(_params(transform))
    inb = fast.make_inbound_sa(_params(transform))
    payloads = [os.urandom(size)] * BATCH
    seal_batch, open_batch = fast.seal_batch, fast.open_batch

    def loop(n: int) -> None:
        for _ in range(0, n, BATCH):
            open_batch(inb, seal_batch(out, payloads, NH_UDP))

    return loop


def bare_evp_round_trip(transform: str, size: int) -> Callable[[int], None]:
    """OpenSSL EVP encrypt+decrypt in a C loop (the compiled module's own helper)."""
    t = parse_transform(transform)
    key = _keymat(transform)
    enc_key, salt = key[: t.enc_key_len], key[t.enc_key_len : t.enc_key_len + 4]
    bare = fast._fastpath.bare_evp_round_trip
    plain_len = _esp_plaintext_len(size)

    def loop(n: int) -> None:
        bare(enc_key, salt, plain_len, n, t.cipher)

    return loop


def compiled_encrypt(transform: str, size: int) -> Callable[[int], None]:
    encrypt = fast.make_outbound_sa(_params(transform)).encrypt
    payload = os.urandom(size)

    def loop(n: int) -> None:
        for _ in range(n):
            encrypt(payload, NH_UDP)

    return loop


def compiled_decrypt(transform: str, size: int) -> Callable[[int], None]:
    """As `ours_decrypt`, with the compiled inbound SA's `open`."""
    packets = _decrypt_pool(transform, size)
    params = _params(transform)

    def loop(n: int) -> None:
        for start in range(0, n, DECRYPT_POOL):
            open_ = fast.make_inbound_sa(params).open
            for esp in packets[: min(DECRYPT_POOL, n - start)]:
                open_(esp)

    return loop


def ours_encrypt(transform: str, size: int) -> Callable[[int], None]:
    encrypt = OutboundSA(_params(transform)).encrypt
    payload = os.urandom(size)

    def loop(n: int) -> None:
        for _ in range(n):
            encrypt(payload, NH_UDP)

    return loop


def bare_encrypt(transform: str, size: int) -> Callable[[int], None]:
    aead, nonce, aad = _bare_aead(transform)
    plain = os.urandom(_esp_plaintext_len(size))
    encrypt = aead.encrypt

    def loop(n: int) -> None:
        for _ in range(n):
            encrypt(nonce, plain, aad)

    return loop


# Decrypt-only loops walk the same DECRYPT_POOL distinct packets, ours and bare alike: one
# packet decrypted again and again would sit in the CPU cache, a pool as large as a whole run
# would not (measured: that alone moved the bare AEAD figure by a factor of 1.6).
DECRYPT_POOL = 2048


def _decrypt_pool(transform: str, size: int) -> list[bytes]:
    out = OutboundSA(_params(transform))
    payload = os.urandom(size)
    return [out.encrypt(payload, NH_UDP) for _ in range(DECRYPT_POOL)]


def ours_decrypt(transform: str, size: int) -> Callable[[int], None]:
    """Decrypt `n` packets of the pool; a fresh InboundSA every DECRYPT_POOL packets keeps
    them from being replays (its set-up, ~5 us, adds ~2 ns a packet)."""
    packets = _decrypt_pool(transform, size)
    params = _params(transform)

    def loop(n: int) -> None:
        for start in range(0, n, DECRYPT_POOL):
            decrypt = InboundSA(params).decrypt
            for esp in packets[: min(DECRYPT_POOL, n - start)]:
                decrypt(esp)

    return loop


def bare_decrypt(transform: str, size: int) -> Callable[[int], None]:
    aead, _nonce, _aad = _bare_aead(transform)
    salt = _keymat(transform)[parse_transform(transform).enc_key_len :]
    # Nonce, ciphertext+tag and AAD of every pool packet, cut out beforehand.
    pool = [(salt + esp[8:16], esp[16:], esp[:8]) for esp in _decrypt_pool(transform, size)]
    decrypt = aead.decrypt

    def loop(n: int) -> None:
        for start in range(0, n, DECRYPT_POOL):
            for nonce, ct, aad in pool[: min(DECRYPT_POOL, n - start)]:
                decrypt(nonce, ct, aad)

    return loop


_SCAPY_ALGOS = {"aes128gcm16": "AES-GCM", "aes256gcm16": "AES-GCM",
                "chacha20poly1305": "CHACHA20-POLY1305"}


def scapy_rate(transform: str, size: int, seconds: float) -> float:
    """scapy's ESP round trips per second, run for `seconds`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from scapy.layers.inet import IP
            from scapy.layers.ipsec import ESP, SecurityAssociation
            from scapy.packet import Raw
    except ImportError:
        return 0.0  # scapy is a test/bench extra; the table then shows no scapy figure

    sa = SecurityAssociation(ESP, spi=SPI, crypt_algo=_SCAPY_ALGOS[transform],
                             crypt_key=_keymat(transform))
    pkt = IP(src="192.0.2.1", dst="192.0.2.2", proto=NH_UDP) / Raw(os.urandom(size))
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        sa.decrypt(sa.encrypt(pkt))
        n += 1
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - t0)


# -- main ----------------------------------------------------------------------------------


def run(quick: bool) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Measure everything; return the result rows and the per-direction figures."""
    rounds, seconds, scapy_seconds = (2, 0.05, 0.2) if quick else (5, 0.2, 0.5)
    compiled = fast.AVAILABLE
    results = []
    for transform in TRANSFORMS:
        for size in SIZES:
            loops = {"ours": ours_round_trip(transform, size),
                     "bare": bare_round_trip(transform, size),
                     "framing": framing_round_trip(transform, size)}
            if compiled:
                loops.update(compiled=compiled_round_trip(transform, size),
                             compiled_batch=compiled_batch_round_trip(transform, size),
                             bare_evp=bare_evp_round_trip(transform, size))
            best = best_interleaved(loops, rounds, seconds)
            results.append({
                "transform": transform,
                "size": size,
                "ours_pps": round(best["ours"]),
                "bare_aead_pps": round(best["bare"]),
                "framing_pps": round(best["framing"]),
                "scapy_pps": round(scapy_rate(transform, size, scapy_seconds)),
                "compiled_pps": round(best.get("compiled", 0)),
                "compiled_batch_pps": round(best.get("compiled_batch", 0)),
                "bare_evp_pps": round(best.get("bare_evp", 0)),
            })
    transform, size = "aes128gcm16", 1400
    enc_loops = {"ours": ours_encrypt(transform, size), "bare": bare_encrypt(transform, size)}
    dec_loops = {"ours": ours_decrypt(transform, size), "bare": bare_decrypt(transform, size)}
    if compiled:
        enc_loops["compiled"] = compiled_encrypt(transform, size)
        dec_loops["compiled"] = compiled_decrypt(transform, size)
    enc = best_interleaved(enc_loops, rounds, seconds)
    dec = best_interleaved(dec_loops, rounds, seconds)
    directions = {
        "encrypt_ours_pps": round(enc["ours"]), "encrypt_bare_aead_pps": round(enc["bare"]),
        "decrypt_ours_pps": round(dec["ours"]), "decrypt_bare_aead_pps": round(dec["bare"]),
        "encrypt_compiled_pps": round(enc.get("compiled", 0)),
        "decrypt_compiled_pps": round(dec.get("compiled", 0)),
    }
    return results, directions


def print_table(results: list[dict[str, Any]], directions: dict[str, float]) -> None:
    """Print the results as a text table, then the per-direction figures."""
    head = (f"{'transform':<18} {'size':>5} {'ours_pps':>10} {'bare_aead_pps':>14} {'ratio':>6} "
            f"{'framing_pps':>12} {'framing/bare':>13} {'ours/framing':>13} "
            f"{'scapy_pps':>10} {'ours/scapy':>11}")
    print(head)
    print("-" * len(head))
    for r in results:
        bare, framing = r["bare_aead_pps"], r["framing_pps"]
        ratio = r["ours_pps"] / bare
        vs_scapy = r["ours_pps"] / r["scapy_pps"] if r["scapy_pps"] else float("inf")
        print(f"{r['transform']:<18} {r['size']:>5} {r['ours_pps']:>10} {bare:>14} {ratio:>6.2f} "
              f"{framing:>12} {framing / bare:>13.2f} {r['ours_pps'] / framing:>13.2f} "
              f"{r['scapy_pps']:>10} {vs_scapy:>10.1f}x")
    print()
    if not any(r["compiled_pps"] for r in results):
        print(f"compiled fast path: not measured ({fast.REASON})")
    else:
        head = (f"{'transform':<18} {'size':>5} {'compiled_pps':>13} {'batch32_pps':>12} "
                f"{'bare_evp_pps':>13} {'compiled/bare_aead':>19} {'batch/bare_aead':>16} "
                f"{'compiled/bare_evp':>18} {'batch/bare_evp':>15}")
        print("compiled fast path (issue 10 target: compiled/bare_aead >= 0.9 at 1400 B "
              "aes128gcm16):")
        print(head)
        print("-" * len(head))
        for r in results:
            bare, evp = r["bare_aead_pps"], r["bare_evp_pps"]
            c, b = r["compiled_pps"], r["compiled_batch_pps"]
            print(f"{r['transform']:<18} {r['size']:>5} {c:>13} {b:>12} {evp:>13} "
                  f"{c / bare:>19.2f} {b / bare:>16.2f} {c / evp:>18.2f} {b / evp:>15.2f}")
    print()
    print("aes128gcm16, 1400 B, one direction at a time:")
    for d in ("encrypt", "decrypt"):
        ours, bare = directions[f"{d}_ours_pps"], directions[f"{d}_bare_aead_pps"]
        comp = directions[f"{d}_compiled_pps"]
        line = f"  {d:<8} ours {ours:>9} pps   bare AEAD {bare:>9} pps   ratio {ours / bare:.2f}"
        if comp:
            line += f"   compiled {comp:>9} pps   ratio {comp / bare:.2f}"
        print(line)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table and optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short, noisier run")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    results, directions = run(args.quick)
    print_table(results, directions)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "directions_aes128gcm16_1400": directions}, f,
                      indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
