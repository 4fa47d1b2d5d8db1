"""vxlanipsec options into SA parameters: accepted values and one-sentence errors."""

from __future__ import annotations

import pytest

from espswitch.ike.options import IkeKeying, ManualKeying, parse_ipsec_options
from espswitch.ipsec import IpsecConfigError

KEY_OUT = "11" * 20
KEY_IN = "22" * 20
LOCAL, REMOTE = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])


def _manual(**extra: str) -> dict[str, str]:
    opts = {"spi_out": "0x1001", "spi_in": "4098", "esp_key_out": KEY_OUT,
            "esp_key_in": KEY_IN}
    opts.update(extra)
    return opts


def test_manual_keying_builds_both_sas_with_defaults() -> None:
    cfg = parse_ipsec_options(_manual(), local_ip=LOCAL, remote_ip=REMOTE)
    assert isinstance(cfg, ManualKeying)
    assert cfg.transform.name == "aes128gcm16" and cfg.mode == "transport"
    assert cfg.outbound.spi == 0x1001 and cfg.inbound.spi == 4098
    assert cfg.outbound.keymat == bytes.fromhex(KEY_OUT)
    assert cfg.inbound.replay_window == 1024
    assert not cfg.encapsulation


def test_all_options_are_honoured() -> None:
    cfg = parse_ipsec_options(_manual(
        esp="aes256gcm16-esn", esp_key_out="aa" * 36, esp_key_in="bb" * 36,
        ipsec_mode="tunnel", replay_window="0", lifetime_packets="100",
        lifetime_bytes="5000", ipsec_encapsulation="yes"), local_ip=LOCAL, remote_ip=REMOTE)
    assert cfg.transform.esn and cfg.mode == "tunnel" and cfg.encapsulation
    assert cfg.outbound.hard.packets == 100 and cfg.outbound.hard.bytes == 5000
    assert cfg.outbound.tunnel_dst == REMOTE and cfg.inbound.tunnel_dst == LOCAL
    assert cfg.inbound.replay_window == 0


@pytest.mark.parametrize(("opts", "needle"), [
    (_manual(esp="aes128ccm"), "options:esp"),
    (_manual(esp_key_out="11" * 19), "options:esp_key_out must be 20 bytes"),
    (_manual(esp_key_in="zz" * 20), "options:esp_key_in must be hexadecimal"),
    (_manual(spi_out="255"), "options:spi_out must be a number from 256"),
    (_manual(spi_in="0x1_0000_0000"), "options:spi_in"),
    (_manual(replay_window="-1"), "options:replay_window"),
    (_manual(replay_window="2000000"), "options:replay_window"),
    (_manual(lifetime_packets="0"), "options:lifetime_packets"),
    (_manual(ipsec_mode="beet"), "options:ipsec_mode must be transport or tunnel"),
    (_manual(ipsec_encapsulation="maybe"), "options:ipsec_encapsulation"),
    (_manual(psk="secret"), "cannot be combined"),
    ({"spi_out": "300"}, "missing spi_in, esp_key_out, esp_key_in"),
    # Issue 9 D4: digits of other scripts, underscores and signs are not numbers here.
    (_manual(spi_out="\u0661\u0660\u0660\u0660\u0660"), "options:spi_out"),
    (_manual(spi_out="1_0000"), "options:spi_out"),
    (_manual(replay_window="+64"), "options:replay_window"),
    (_manual(replay_window="\uff16\uff14"), "options:replay_window"),
    # ... and options of the other way of keying are refused, not ignored.
    (_manual(rekey_time="-5"), "options:rekey_time applies to IKEv2-keyed tunnels only"),
    (_manual(ike="garbage"), "options:ike applies to IKEv2-keyed tunnels only"),
    (_manual(dpd_delay="10"), "options:dpd_delay applies to IKEv2-keyed tunnels only"),
    (_manual(rekey_packets="10"), "options:rekey_packets applies to IKEv2"),
    ({"psk": "swordfish", "lifetime_packets": "100"},
     "options:lifetime_packets applies to manually keyed tunnels only"),
    ({"psk": "swordfish", "rekey_time": "\u0663\u0666\u0660\u0660"}, "options:rekey_time"),
    ({"psk": "swordfish", "rekey_time": "inf"}, "options:rekey_time"),
])
def test_bad_options_give_one_sentence_naming_the_option(opts: dict, needle: str) -> None:
    with pytest.raises(IpsecConfigError) as err:
        parse_ipsec_options(opts, local_ip=LOCAL, remote_ip=REMOTE)
    message = str(err.value)
    assert needle in message and "\n" not in message
    for value in opts.values():
        if len(value) >= 32:  # key material
            assert value not in message


def test_psk_selects_ike_keying() -> None:
    cfg = parse_ipsec_options({"psk": "swordfish"})
    assert isinstance(cfg, IkeKeying) and cfg.psk == b"swordfish"
    assert "swordfish" not in repr(cfg)
