import pytest

from kvplug.config import ConfigError, KVPlugConfig, parse_size


@pytest.mark.parametrize(
    "text,expected",
    [("8GiB", 8 * 2**30), ("512 MiB", 512 * 2**20), ("2G", 2 * 10**9), ("4096", 4096), (123, 123), ("1.5GiB", 3 * 2**29)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["8 parsecs", "", "-1", True, "GiB", None])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_defaults_are_valid():
    cfg = KVPlugConfig()
    assert cfg.codec == "raw" and cfg.ssd_path is None


def test_from_dict_coerces_sizes_and_bools():
    cfg = KVPlugConfig.from_dict({"cpu_bytes": "1GiB", "shared_memory": "false", "io_threads": "8"})
    assert cfg.cpu_bytes == 2**30 and cfg.shared_memory is False and cfg.io_threads == 8


def test_bad_choice_names_key_value_and_accepted():
    with pytest.raises(ConfigError) as e:
        KVPlugConfig.from_dict({"codec": "zstd"})
    msg = str(e.value)
    assert "codec" in msg and "'zstd'" in msg and "'raw'" in msg and "'int4h'" in msg and "'int4kc'" in msg
    assert KVPlugConfig.from_dict({"codec": "int4kc", "int4h_group": 32}).codec == "int4kc"
    assert "'int4kcs'" in msg and KVPlugConfig.from_dict({"codec": "int4kcs"}).codec == "int4kcs"


def test_bad_size_names_key_and_format():
    with pytest.raises(ConfigError) as e:
        KVPlugConfig.from_dict({"cpu_bytes": "lots"})
    assert "cpu_bytes" in str(e.value) and "8GiB" in str(e.value)


def test_unknown_key_lists_accepted_keys():
    with pytest.raises(ConfigError) as e:
        KVPlugConfig.from_dict({"cpu_size": "1GiB"})
    assert "cpu_size" in str(e.value) and "cpu_bytes" in str(e.value)


@pytest.mark.parametrize("key,value", [("io_threads", 0), ("int4h_group", 3), ("cpu_bytes", 0), ("write_queue_blocks", -1)])
def test_out_of_range(key, value):
    with pytest.raises(ConfigError, match=key):
        KVPlugConfig.from_dict({key: value})


def test_env_and_yaml_precedence(tmp_path):
    y = tmp_path / "kvplug.yaml"
    y.write_text("cpu_bytes: 1GiB\ncodec: int4h\neviction: s3fifo\n")
    env = {"KVPLUG_CONFIG": str(y), "KVPLUG_CODEC": "raw", "KVPLUG_IO_THREADS": "2", "OTHER": "x"}
    cfg = KVPlugConfig.load({"io_threads": 3}, environ=env)
    assert cfg.cpu_bytes == 2**30  # from YAML
    assert cfg.eviction == "s3fifo"  # from YAML
    assert cfg.codec == "raw"  # env beats YAML
    assert cfg.io_threads == 3  # dict beats env


def test_yaml_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="cannot read YAML"):
        KVPlugConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        KVPlugConfig.from_yaml(bad)


def test_env_bad_value_names_source():
    with pytest.raises(ConfigError, match="environment"):
        KVPlugConfig.from_env({"KVPLUG_SSD_BYTES": "huge"})


def test_transfer_cpus_accepts_auto_shared_and_cpu_lists():
    from kvplug.config import parse_cpu_list

    assert KVPlugConfig.from_dict({"transfer_cpus": "shared"}).transfer_cpus == "shared"
    assert parse_cpu_list(KVPlugConfig.from_dict({"transfer_cpus": "1,4-6"}).transfer_cpus) == {1, 4, 5, 6}
    for bad in ("fast", "3-1", "1,,2", "-2"):
        with pytest.raises(ConfigError, match="transfer_cpus"):
            KVPlugConfig.from_dict({"transfer_cpus": bad})


def test_transfer_cpus_from_yaml_as_a_number_and_bounded(tmp_path):
    path = tmp_path / "kvplug.yaml"
    path.write_text("transfer_cpus: 3\n")
    assert KVPlugConfig.from_yaml(path).transfer_cpus == "3"
    with pytest.raises(ConfigError, match="transfer_cpus"):
        KVPlugConfig.from_dict({"transfer_cpus": "0-1000000000"})


SECRET = "kvplug-test-secret-0123456789abcdef"


def test_integrity_key_is_a_reference_read_at_start_up(tmp_path):
    cfg = KVPlugConfig.load({"integrity_key": "env:KVPLUG_TEST_SECRET"}, environ={})
    assert cfg.integrity_secret({"KVPLUG_TEST_SECRET": SECRET}) == SECRET.encode()
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    cfg = KVPlugConfig.from_env({"KVPLUG_INTEGRITY_KEY": f"file:{key_file}"})
    assert cfg.integrity_secret() == SECRET.encode()  # one trailing newline is not part of it
    assert SECRET not in repr(cfg) and KVPlugConfig().integrity_secret() is None


def test_integrity_key_errors_name_the_reference_never_the_secret(tmp_path):
    for pasted in (SECRET, "env:", "file:relative/key", "hex:00ff"):  # a secret pasted in place of a reference
        with pytest.raises(ConfigError, match="integrity_key=<not shown>.*env:NAME") as e:
            KVPlugConfig.from_dict({"integrity_key": pasted})
        assert repr(pasted) not in str(e.value) and "relative" not in str(e.value) and SECRET not in str(e.value)
    cfg = KVPlugConfig.from_dict({"integrity_key": "env:KVPLUG_TEST_SECRET"})
    with pytest.raises(ConfigError, match="KVPLUG_TEST_SECRET.*not set"):
        cfg.integrity_secret({})
    with pytest.raises(ConfigError, match="16 to 4096 bytes") as e:
        cfg.integrity_secret({"KVPLUG_TEST_SECRET": "short-secret"})
    assert "short-secret" not in str(e.value)
    missing = KVPlugConfig.from_dict({"integrity_key": f"file:{tmp_path}/none"})
    with pytest.raises(ConfigError, match="cannot read"):
        missing.integrity_secret()
