"""KVPlugConfig: every knob of kvplug in one validated dataclass.

Built from (lowest to highest precedence) defaults, a YAML file, KVPLUG_*
environment variables and a dict (vLLM's ``kv_connector_extra_config``).
A bad value fails at start-up with a message naming the key, the value and
what would be accepted.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

from kvplug import config_remote

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


class ConfigError(ValueError):
    """A configuration value kvplug cannot accept."""


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as "8GiB", "512 MiB", "2G", "4096"."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a size")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str) and (m := _SIZE.match(value)) and m.group(2).lower() in _UNITS:
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise ValueError("not a size")
    if n < 0:
        raise ValueError("negative size")
    return n


MAX_CPUS = 8192  # Linux's largest NR_CPUS


def parse_cpu_list(value: str) -> set[int]:
    """CPU ids from a list such as "0,2-4" (Linux's cpuset notation)."""
    cpus: set[int] = set()
    for part in value.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ValueError(f"not a CPU list: {value!r}")
        if int(hi or lo) >= MAX_CPUS:
            raise ValueError(f"CPU ids must be below {MAX_CPUS}: {value!r}")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("not a boolean")


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a boolean is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError("not an integer")


def _parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        out = float(value.strip())
    else:
        raise ValueError("not a number")
    if out != out or out in (float("inf"), float("-inf")):
        raise ValueError("not a finite number")
    return out


@dataclass(frozen=True)
class KVPlugConfig:
    # CPU tier: bytes of the one preallocated slab.
    cpu_bytes: int = 4 * 2**30
    # SSD tier: a directory (None disables the tier) and its byte budget.
    ssd_path: str | None = None
    ssd_bytes: int = 64 * 2**30
    # "raw" is bit-exact; "int4h" is Hadamard-rotated INT4 (3.76x fewer bytes); "int4kc" is
    # INT4 with keys per channel over the block (3.76x at 128-token blocks; README's figures);
    # "int4kcs" is int4kc with each block's first token's keys exact (3.71x at head 128).
    codec: str = "raw"
    # int4h (int4kc: values) quantization group along head_dim; 0 means the whole head.
    int4h_group: int = 0
    # CPU-tier eviction: "lru" or "s3fifo".
    eviction: str = "lru"
    # SSD: concurrent I/O threads, O_DIRECT use, write policy.
    io_threads: int = 4
    o_direct: str = "auto"
    # "through": every stored block is queued for SSD at once (survives a
    # restart); "back": only blocks evicted from the CPU tier go to SSD.
    ssd_write: str = "through"
    # Bounded write queue to SSD; a full queue drops the write (counted).
    write_queue_blocks: int = 256
    # Share the CPU slab through POSIX shared memory (another process maps it).
    shared_memory: bool = True
    # Directory for the shared-memory slab file.
    shm_dir: str = "/dev/shm"
    # Load a hit only when it beats recomputing (measured); "always" loads every hit.
    load_policy: str = "always"
    # Smallest hit worth loading, in tokens.
    min_hit_tokens: int = 1
    # Store partial tail blocks (token-granular hits).
    store_partial_blocks: bool = True
    # Where the CPU transfer thread (encode/decode beside the forward pass) runs:
    # "auto" (the cores the engine left free of compute threads, if any),
    # "shared" (the compute cores), or a CPU list such as "2,3" or "4-7".
    transfer_cpus: str = "auto"
    # Longest an SSD promotion may keep a request waiting (seconds); sooner when recomputing
    # the hit would be faster (from measured prefill speed). Then the request recomputes.
    promotion_timeout_s: float = 5.0
    # Shortest such wait, whatever the estimates say (they are noisy for prompts that take
    # milliseconds to recompute): a promotion gets at least this long, or a tenth of
    # recomputing its hit if that is shorter (kvplug.policy: never over recompute + 10%).
    promotion_min_wait_s: float = 0.05
    # A block that cannot be loaded: "recompute" it (the request goes on) or "fail"
    # the request (vLLM's kv_load_failure_policy, set from this for both spellings).
    load_failure_policy: str = "recompute"
    # SSD tier integrity (opt-in): where a secret is, never the secret itself:
    # "env:NAME" (an environment variable) or "file:/path" (a file). Blocks then carry
    # a keyed MAC and one that fails it is a miss (kvplug/tiers/ssd.py).
    integrity_key: str | None = None
    # Remote tier: a Valkey / Redis server or cluster shared by every engine of a deployment
    # (kvplug/tiers/remote.py); None disables it. Accepted forms: kvplug/tiers/remote_url.py.
    remote_url: str | None = None
    # "auto": a cluster when the URL names several seed nodes; "on" / "off" to say so for one seed.
    remote_cluster: str = "auto"
    # ACL user (not secret) and where its password is: "env:NAME" or "file:/path" (never logged).
    remote_username: str | None = None
    remote_password: str | None = None
    # Prefix of every key kvplug writes: one per deployment sharing a server.
    remote_namespace: str = "kvplug"
    # rediss:// only: a PEM file of the CA certificates to trust instead of the system's (a private
    # CA in front of the pool: stunnel, Envoy, the server's own TLS). The host name is checked too.
    remote_tls_ca_file: str | None = None
    # Socket timeout of each round trip, and how long an unreachable server is left alone.
    remote_timeout_s: float = 0.5
    remote_retry_s: float = 5.0
    # "through": every block stored in the CPU tier is queued for the server; "back": only blocks
    # evicted from the CPU tier; "off": read only.
    remote_write: str = "through"
    # Bounded write queue to the server; a full queue drops the write (counted). At most a quarter
    # of the CPU tier's slots (each queued block pins one): larger values are clamped at start-up.
    remote_queue_blocks: int = 256
    # Most blocks one fetch asks the server for (a prompt's blocks past it are recomputed); at most
    # a quarter of the CPU tier's slots (they land there): larger values are clamped at start-up.
    remote_fetch_blocks: int = 64

    _CHOICES = {
        "codec": ("raw", "int4h", "int4kc", "int4kcs"),
        "eviction": ("lru", "s3fifo"),
        "o_direct": ("auto", "on", "off"),
        "ssd_write": ("through", "back"),
        "load_policy": ("always", "auto"),
        "load_failure_policy": ("recompute", "fail"),
        "remote_cluster": ("auto", "on", "off"),
        "remote_write": ("through", "back", "off"),
    }
    _SIZES = ("cpu_bytes", "ssd_bytes")

    def __post_init__(self) -> None:
        for key, accepted in self._CHOICES.items():
            value = getattr(self, key)
            if value not in accepted:
                raise ConfigError(_message(key, value, " or ".join(map(repr, accepted))))
        if self.cpu_bytes <= 0:
            raise ConfigError(_message("cpu_bytes", self.cpu_bytes, 'a positive size such as "8GiB"'))
        if self.ssd_path is not None and self.ssd_bytes <= 0:
            raise ConfigError(_message("ssd_bytes", self.ssd_bytes, 'a positive size such as "100GiB"'))
        if self.int4h_group < 0 or (self.int4h_group & (self.int4h_group - 1)):
            raise ConfigError(_message("int4h_group", self.int4h_group, "0 (whole head) or a power of two"))
        if self.transfer_cpus not in ("auto", "shared"):
            try:
                parse_cpu_list(self.transfer_cpus)
            except ValueError:
                raise ConfigError(_message("transfer_cpus", self.transfer_cpus,
                                           '"auto", "shared" or a CPU list such as "2,3" or "4-7"')) from None
        if not 0 < self.promotion_timeout_s <= 3600:
            raise ConfigError(_message("promotion_timeout_s", self.promotion_timeout_s,
                                       "a number of seconds in (0, 3600]"))
        if not 0 <= self.promotion_min_wait_s <= 3600:  # (promotion_timeout_s still caps the wait)
            raise ConfigError(_message("promotion_min_wait_s", self.promotion_min_wait_s,
                                       "a number of seconds in [0, 3600]"))
        if self.integrity_key is not None and not _INTEGRITY_REF.match(self.integrity_key):
            raise ConfigError(_INTEGRITY_HIDDEN)  # the value may be the secret itself: never echoed
        config_remote.check(self)
        # Upper bounds too: a value that passes here must not fail later (a million I/O threads).
        for key, low, high in (("io_threads", 1, 256), ("write_queue_blocks", 1, 1 << 24),
                               ("min_hit_tokens", 1, 1 << 24)):
            if not low <= getattr(self, key) <= high:
                raise ConfigError(_message(key, getattr(self, key), f"an integer in [{low}, {high}]"))
        if self.int4h_group > 4096:
            raise ConfigError(_message("int4h_group", self.int4h_group, "0 (whole head) or a power of two <= 4096"))

    # -- builders -----------------------------------------------------------

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "KVPlugConfig":
        return cls(**_coerce(dict(values), source="config"))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "KVPlugConfig":
        return cls(**_coerce(_env_values(environ), source="environment"))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "KVPlugConfig":
        return cls(**_coerce(_yaml_values(path), source=str(path)))

    @classmethod
    def load(
        cls,
        values: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> "KVPlugConfig":
        """Defaults < YAML (``config_file`` key or KVPLUG_CONFIG) < KVPLUG_* env < dict."""
        values = dict(values or {})
        env = _env_values(environ)
        yaml_path = values.pop("config_file", None) or env.pop("config_file", None)
        merged: dict[str, Any] = {}
        if yaml_path:
            merged.update(_coerce(_yaml_values(yaml_path), source=str(yaml_path)))
        merged.update(_coerce(env, source="environment"))
        merged.update(_coerce(values, source="config"))
        return cls(**merged)

    def replace(self, **changes: Any) -> "KVPlugConfig":
        return dataclasses.replace(self, **_coerce(changes, source="config"))

    def integrity_secret(self, environ: Mapping[str, str] | None = None) -> bytes | None:
        """The secret ``integrity_key`` points at, read now (None when unset). Errors name the
        reference, never the secret."""
        return _read_secret("integrity_key", self.integrity_key, environ, _SECRET_MIN)

    def remote_secret(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The password ``remote_password`` points at, read now (None when unset)."""
        secret = _read_secret("remote_password", self.remote_password, environ, 1)
        return None if secret is None else secret.decode("utf-8", "replace")


def _read_secret(name: str, ref: str | None, environ: Mapping[str, str] | None, low: int) -> bytes | None:
    if ref is None:
        return None
    kind, _, where = ref.partition(":")
    if kind == "env":
        value = (os.environ if environ is None else environ).get(where, "")
        if not value:
            raise ConfigError(f"kvplug config: {name}={ref!r} names the environment variable {where}, "
                              f"which is not set or empty; expected it to hold the secret")
        secret = value.encode()
    else:
        path = os.path.expanduser(where)
        try:
            with open(path, "rb") as f:
                secret = f.read(_SECRET_MAX + 1).rstrip(b"\r\n")
        except (OSError, ValueError) as e:  # ValueError: a NUL in the path
            why = getattr(e, "strerror", None) or "not a path"
            raise ConfigError(f"kvplug config: {name}={ref!r}: cannot read {path!r} ({why}); "
                              f"expected a readable file that holds the secret") from None
    if not low <= len(secret) <= _SECRET_MAX:
        raise ConfigError(f"kvplug config: {name}={ref!r}: the secret there is not accepted; expected "
                          f"{low} to {_SECRET_MAX} bytes (e.g. head -c 32 /dev/urandom | base64)")
    return secret


_INTEGRITY_REF = re.compile(r"(env:[A-Za-z_][A-Za-z0-9_]*|file:(/|~).*)\Z", re.S)
_INTEGRITY_HIDDEN = ("kvplug config: integrity_key=<not shown> is not accepted; expected 'env:NAME' (an environment "
                     "variable holding the secret) or 'file:/absolute/path' (a file holding it); the value is not "
                     "shown as it may be the secret itself")
_SECRET_MIN, _SECRET_MAX = 16, 4096


def _message(key: str, value: Any, accepted: str) -> str:
    return f"kvplug config: {key}={value!r} is not accepted; expected {accepted}"


def _field_kinds() -> dict[str, str]:
    kinds = {}
    for f in fields(KVPlugConfig):
        if f.name in KVPlugConfig._SIZES:
            kinds[f.name] = "size"
        elif f.type in ("bool",):
            kinds[f.name] = "bool"
        elif f.type in ("int",):
            kinds[f.name] = "int"
        elif f.type in ("float",):
            kinds[f.name] = "float"
        elif f.type == "str | None":
            kinds[f.name] = "optional_str"
        else:
            kinds[f.name] = "str"
    return kinds


def _coerce(values: dict[str, Any], source: str) -> dict[str, Any]:
    kinds = _field_kinds()
    out = {}
    for key, value in values.items():
        if key not in kinds:
            raise ConfigError(
                f"kvplug config ({source}): unknown key {key!r}; accepted keys: {', '.join(sorted(kinds))}"
            )
        kind = kinds[key]
        try:
            if kind == "size":
                value = parse_size(value)
            elif kind == "bool":
                value = _parse_bool(value)
            elif kind == "int":
                value = _parse_int(value)
            elif kind == "float":
                value = _parse_float(value)
            elif kind == "optional_str":
                value = None if value in (None, "", "none", "None") else str(os.path.expanduser(str(value)))
            elif key == "transfer_cpus" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)  # YAML reads `transfer_cpus: 3` as a number
            elif not isinstance(value, str):
                raise ValueError("not a string")
        except ValueError:
            accepted = {
                "size": 'a size: bytes as an integer or a string such as "8GiB", "512MiB", "2GB"',
                "bool": "true or false",
                "int": "an integer",
                "float": "a number",
                "optional_str": "a path",
                "str": "a string",
            }[kind]
            raise ConfigError(f"kvplug config ({source}): " + _message(key, value, accepted)[len("kvplug config: "):]) from None
        out[key] = value
    return out


def _env_values(environ: Mapping[str, str] | None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if name.startswith("KVPLUG_"):
            key = name[len("KVPLUG_"):].lower()
            if key == "config":
                key = "config_file"
            out[key] = value
    return out


def _yaml_values(path: str | os.PathLike) -> dict[str, Any]:
    import yaml  # only needed when a file is given

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"kvplug config: cannot read YAML file {str(path)!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"kvplug config: {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"kvplug config: {str(path)!r} must hold a mapping of keys to values")
    return data
