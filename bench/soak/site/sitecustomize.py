"""Installs bench/soak's fault injection and store sampler (../inject.py) in every Python
process started with this folder on PYTHONPATH and SOAK_CTL_DIR set (vLLM's engine
processes are spawned: this is how code reaches them without changing kvplug)."""

import os

if os.environ.get("SOAK_CTL_DIR"):
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "kvplug_soak_inject", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "inject.py"))
    _inject = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_inject)
    _inject.install(os.environ["SOAK_CTL_DIR"])
