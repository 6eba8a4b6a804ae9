"""Installs bench/soak's fault injection and store sampler (../inject.py, with SOAK_CTL_DIR set;
with SOAK_TRACE set too, the step and promotion timeline of ../trace.py beside them) and its
memory probe (../probe.py, with SOAK_PROBE_DIR set) in every Python process started with this
folder on PYTHONPATH (vLLM's engine processes are spawned: this is how code reaches them
without changing kvplug)."""

import os


def _load(name, file):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        name, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if os.environ.get("SOAK_CTL_DIR"):
    _extra = None
    if os.environ.get("SOAK_TRACE"):
        _trace = _load("kvplug_soak_trace", "trace.py")
        _trace.start(os.environ["SOAK_CTL_DIR"])
        _extra = _trace.PATCHES
    _load("kvplug_soak_inject", "inject.py").install(os.environ["SOAK_CTL_DIR"], _extra)
if os.environ.get("SOAK_PROBE_DIR"):
    _load("kvplug_soak_probe", "probe.py").install(os.environ["SOAK_PROBE_DIR"])
