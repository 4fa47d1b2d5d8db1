"""Secret option values are replaced in every log message, in JSON and in text."""

from __future__ import annotations

import logging

from espswitch.vswitchd.redact import HIDDEN, RedactFilter, redact


def test_ovsdb_update_json_loses_every_secret_value_and_keeps_the_rest():
    msg = ('received notification, method="update3", params=[{"Interface":{"u":{"modify":'
           '{"options":["map",[["esp_key_in","00ab11"],["esp_key_out","c0ffee"],'
           '["psk","a \\"quoted\\" secret"],["remote_ip","192.0.2.2"]]]}}}}]')
    out = redact(msg)
    for secret in ("00ab11", "c0ffee", "quoted"):
        assert secret not in out
    assert out.count(HIDDEN) == 3 and '"remote_ip","192.0.2.2"' in out


def test_text_forms_are_hidden_too():
    out = redact("options:psk=hunter2 {'esp_key_out': 'abcd', 'esp': 'aes128gcm16'} "
                 "esp_key_in: deadbeef")
    for secret in ("hunter2", "abcd", "deadbeef"):
        assert secret not in out
    assert "aes128gcm16" in out


def test_messages_without_secrets_are_untouched():
    msg = "tun0: esp=aes128gcm16 spi_out=0x1001 keying manual"
    assert redact(msg) is msg


def test_filter_rewrites_the_record():
    record = logging.LogRecord("file", logging.DEBUG, __file__, 1,
                               '["psk","s3cret"] and %s', ("more",), None)
    assert RedactFilter().filter(record)
    assert "s3cret" not in record.getMessage() and "more" in record.getMessage()
