"""Random and malformed settings: a config or a ConfigError naming the key, never a traceback."""

from __future__ import annotations

import dataclasses
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvplug.config import ConfigError, KVPlugConfig

FIELDS = [f.name for f in dataclasses.fields(KVPlugConfig)]

values = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["8GiB", "0", "-1", "1e3", "nan", "inf", "1.5", "0,2-4", "4-2", "auto",
                                           "raw", "int4h", "lru", "true", "off", "99999999999999999999",
                                           "redis://127.0.0.1:6379", "rediss://h:1,h:2/0", "redis://u:pw@h:1",
                                           "redis://h:99999", "valkey://h", "env:KVPLUG_PW", "file:/nonexistent",
                                           "through", "back", "on", "kvplug-prod"]),
    st.lists(st.integers(0, 9), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.binary(max_size=4),
)
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=10))


def check(settings_dict: dict) -> None:
    try:
        KVPlugConfig.load(settings_dict, environ={})
    except ConfigError as e:
        message = str(e)
        assert message.startswith("kvplug config")
        named = [k for k in settings_dict if repr(k) in message or re.search(rf"\b{re.escape(k)}=", message)]
        assert named, f"the message names no key: {message}"
        assert "expected" in message or "accepted" in message, message


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=4))
def test_any_extra_config_gives_a_config_or_a_clear_error(settings_dict):
    check(settings_dict)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(FIELDS), values)
def test_every_key_with_any_value(key, value):
    check({key: value})


def test_values_that_would_fail_later_are_refused_now():
    for key, value in (("io_threads", 10**6), ("write_queue_blocks", 10**12), ("int4h_group", 2**20)):
        try:
            KVPlugConfig.load({key: value}, environ={})
        except ConfigError as e:
            assert key in str(e) and "expected" in str(e)
        else:
            raise AssertionError(f"{key}={value} was accepted")


def test_remote_credentials_never_appear_in_errors():
    for key, value in (("remote_url", "redis://admin:hunter2secret@10.0.0.1:6379"),
                       ("remote_url", "rediss://:hunter2secret@h:1,h:2"),
                       ("remote_password", "hunter2secret")):
        try:
            KVPlugConfig.load({key: value}, environ={})
        except ConfigError as e:
            assert key in str(e) and "expected" in str(e) and "hunter2" not in str(e)
        else:
            raise AssertionError(f"{key}={value} was accepted")


def test_remote_settings_are_checked_together():
    ok = KVPlugConfig.load({"remote_url": "redis://a:7000,b:7001", "remote_password": "env:PW"}, environ={})
    assert ok.remote_secret({"PW": "pw"}) == "pw"
    for settings_dict in ({"remote_url": "redis://a:7000,b:7001", "remote_cluster": "off"},
                          {"remote_url": "redis://a:7000,b:7001/3"}, {"remote_namespace": "has space"},
                          {"remote_timeout_s": 0}, {"remote_queue_blocks": 0}, {"remote_write": "sometimes"},
                          {"remote_fetch_blocks": 0}, {"remote_fetch_blocks": 5000},
                          {"remote_url": "rediss://a:1", "remote_tls_ca_file": "/nonexistent/ca.pem"},
                          {"remote_url": "rediss://a:1", "remote_tls_ca_file": __file__},  # not PEM
                          {"remote_url": "redis://a:1", "remote_tls_ca_file": "/etc/ssl/certs/ca-certificates.crt"}):
        try:
            KVPlugConfig.load(settings_dict, environ={})
        except ConfigError as e:
            assert any(k in str(e) for k in settings_dict) and "expected" in str(e)
        else:
            raise AssertionError(f"{settings_dict} was accepted")
    try:
        ok.remote_secret({})
    except ConfigError as e:
        assert "remote_password" in str(e) and "PW" in str(e)
    else:
        raise AssertionError("an unset password variable was accepted")
