"""Installs the TTFT bench's timers (../profile_hooks.py) in every Python process
started with this folder on PYTHONPATH and TTFT_BENCH_PROFILE_DIR set."""

import os

if os.environ.get("TTFT_BENCH_PROFILE_DIR"):
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "kvplug_bench_profile_hooks",
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "profile_hooks.py"))
    _hooks = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_hooks)
    _hooks.install_on_import(os.environ["TTFT_BENCH_PROFILE_DIR"])
