"""Installs bench/soak's fault injection and store sampler (../inject.py) in every Python
process started with this folder on PYTHONPATH and SOAK_CTL_DIR set (vLLM's engine
processes are spawned: this is how code reaches them without changing kvplug); with
SOAK_TRACE set too, the step and promotion timeline (../trace.py) beside them."""

import os

if os.environ.get("SOAK_CTL_DIR"):
    import importlib.util

    def _load(name, file):
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        spec = importlib.util.spec_from_file_location(name, os.path.join(here, file))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    _inject = _load("kvplug_soak_inject", "inject.py")
    _extra = None
    if os.environ.get("SOAK_TRACE"):
        _trace = _load("kvplug_soak_trace", "trace.py")
        _trace.start(os.environ["SOAK_CTL_DIR"])
        _extra = _trace.PATCHES
    _inject.install(os.environ["SOAK_CTL_DIR"], _extra)
