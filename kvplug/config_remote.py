"""Validation of the remote tier's keys (kvplug/config.py's ``KVPlugConfig``), apart to keep that file short.

The keys whose bound depends on the CPU tier (``remote_queue_blocks``,
``remote_fetch_blocks``: at most a quarter of its slots) are clamped when the
store starts (kvplug/store_remote.py): the slot count is known only once the
model's block size is.
"""

from __future__ import annotations

import re

from kvplug.tiers import remote_url


def check(cfg) -> None:
    """Raise ConfigError naming the key, the value and what is accepted."""
    from kvplug.config import _INTEGRITY_HIDDEN, _INTEGRITY_REF, ConfigError, _message  # config imports this module

    if cfg.remote_url is not None:
        try:
            url = remote_url.parse(cfg.remote_url)
        except ValueError as e:
            shown = "<not shown>" if "@" in cfg.remote_url else repr(cfg.remote_url)  # may hold a password
            raise ConfigError(f"kvplug config: remote_url={shown} is not accepted ({e}); "
                              f"expected {remote_url.ACCEPTED}") from None
        if cfg.remote_cluster == "off" and len(url.nodes) > 1:
            raise ConfigError(_message("remote_cluster", cfg.remote_cluster,
                                       f"'auto' or 'on': remote_url names {len(url.nodes)} seed nodes"))
    if cfg.remote_tls_ca_file is not None:
        _check_ca_file(cfg, _message, ConfigError)
    if cfg.remote_password is not None and not _INTEGRITY_REF.match(cfg.remote_password):
        raise ConfigError(_INTEGRITY_HIDDEN.replace("integrity_key", "remote_password"))
    if cfg.remote_username is not None and not re.fullmatch(r"[A-Za-z0-9_.@-]{1,128}", cfg.remote_username):
        raise ConfigError(_message("remote_username", cfg.remote_username,
                                   "1-128 letters, digits or _ . @ -"))
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", cfg.remote_namespace):
        raise ConfigError(_message("remote_namespace", cfg.remote_namespace,
                                   "1-64 letters, digits or _ . - (one per deployment)"))
    for key, high in (("remote_timeout_s", 60), ("remote_retry_s", 3600)):
        if not 0 < getattr(cfg, key) <= high:
            raise ConfigError(_message(key, getattr(cfg, key), f"a number of seconds in (0, {high}]"))
    for key, high in (("remote_queue_blocks", 1 << 20), ("remote_fetch_blocks", 4096)):
        if not 1 <= getattr(cfg, key) <= high:
            raise ConfigError(_message(key, getattr(cfg, key), f"an integer in [1, {high}]"))


def _check_ca_file(cfg, message, error) -> None:
    """A readable PEM file of CA certificates, for a rediss:// URL."""
    import ssl

    accepted = "a readable PEM file of CA certificates, with a rediss:// remote_url"
    if cfg.remote_url is None or not remote_url.parse(cfg.remote_url).tls:
        raise error(message("remote_tls_ca_file", cfg.remote_tls_ca_file, accepted + " (remote_url is not rediss://)"))
    try:
        ssl.create_default_context(cafile=cfg.remote_tls_ca_file)
    except (OSError, ssl.SSLError, ValueError, TypeError) as e:
        raise error(message("remote_tls_ca_file", cfg.remote_tls_ca_file, f"{accepted} ({e})")) from None
