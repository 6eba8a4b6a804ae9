"""The ``vllm.general_plugins`` entry point: vLLM calls ``register`` in every
process (API server, EngineCore, workers) before it builds its argument parser."""

from __future__ import annotations

NAME = "kvplug"


def register() -> None:
    """Make ``kv_connector: "kvplug"`` resolvable and add kvplug's ``vllm serve`` options. Idempotent."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector(NAME, "kvplug.connectors.vllm.connector", "KVPlugConnector")
    except ValueError:
        pass  # registered already (plugins may load more than once per process)

    from . import cli

    cli.install()
