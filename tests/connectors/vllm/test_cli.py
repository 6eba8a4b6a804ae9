"""The plugin's registration and ``vllm serve`` options, without an engine."""

from __future__ import annotations

import json

import pytest

from kvplug.config import ConfigError
from kvplug.connectors.vllm import plugin


@pytest.fixture(scope="module")
def parse():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    plugin.register()
    parser = make_arg_parser(FlexibleArgumentParser())
    return lambda *argv: AsyncEngineArgs.from_cli_args(parser.parse_args(["/some/model", *argv]))


def test_register_is_idempotent():
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    plugin.register()
    plugin.register()
    assert KVConnectorFactory.get_connector_class_by_name("kvplug").__name__ == "KVPlugConnector"


def test_options_become_a_kv_transfer_config(parse):
    kvt = parse("--kv-connector", "kvplug", "--kvplug-cpu-bytes", "8GiB", "--kvplug-ssd-path", "/mnt/kv",
                "--kvplug-ssd-bytes", "100GiB", "--kvplug-codec", "int4h").kv_transfer_config
    assert (kvt.kv_connector, kvt.kv_role, kvt.kv_load_failure_policy) == ("kvplug", "kv_both", "recompute")
    assert kvt.kv_connector_extra_config == {"cpu_bytes": "8GiB", "ssd_path": "/mnt/kv", "ssd_bytes": "100GiB",
                                             "codec": "int4h"}


def test_json_form_is_left_alone(parse):
    config = {"kv_connector": "kvplug", "kv_role": "kv_both", "kv_connector_extra_config": {"cpu_bytes": "1GiB"}}
    kvt = parse("--kv-transfer-config", json.dumps(config)).kv_transfer_config
    assert kvt.kv_connector == "kvplug" and kvt.kv_connector_extra_config == {"cpu_bytes": "1GiB"}


def test_options_override_the_json_form(parse):
    config = {"kv_connector": "kvplug", "kv_role": "kv_both", "kv_connector_extra_config": {"cpu_bytes": "1GiB",
                                                                                            "codec": "int4h"}}
    kvt = parse("--kv-transfer-config", json.dumps(config), "--kv-connector", "kvplug",
                "--kvplug-cpu-bytes", "2GiB").kv_transfer_config
    assert kvt.kv_connector_extra_config == {"cpu_bytes": "2GiB", "codec": "int4h"}


def test_no_options_no_connector(parse):
    assert parse().kv_transfer_config is None


def test_kvplug_options_need_the_connector(parse):
    with pytest.raises(ValueError, match="--kvplug-codec need --kv-connector kvplug"):
        parse("--kvplug-codec", "raw")


def test_another_connector_in_the_json_conflicts(parse):
    config = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both"}
    with pytest.raises(ValueError, match="conflicts with --kv-transfer-config"):
        parse("--kv-transfer-config", json.dumps(config), "--kv-connector", "kvplug")


def test_bad_value_fails_with_kvplugs_message(parse):
    with pytest.raises(ConfigError, match=r"cpu_bytes='lots' is not accepted"):
        parse("--kv-connector", "kvplug", "--kvplug-cpu-bytes", "lots")


def test_any_kvplug_option_values_give_a_config_or_a_clear_error():
    from types import SimpleNamespace

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from kvplug.connectors.vllm.cli import OPTIONS, kv_transfer_config

    texts = st.one_of(st.text(max_size=12), st.sampled_from(["8GiB", "0", "-3GiB", "raw", "int4h", "1e99", "", " "]))

    @settings(max_examples=150, deadline=None)
    @given(st.fixed_dictionaries({key: st.one_of(st.none(), texts) for key in OPTIONS}))
    def run(values):
        args = SimpleNamespace(kv_connector="kvplug", kv_transfer_config=None,
                               **{f"kvplug_{k}": v for k, v in values.items()})
        try:
            kv_transfer_config(args)
        except ConfigError as e:
            assert any(k in str(e) for k, v in values.items() if v is not None) and "expected" in str(e)

    run()
