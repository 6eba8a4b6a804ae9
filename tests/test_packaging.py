"""kvplug as users install it: a built wheel (not the editable checkout) registers vLLM's plugin
entry point and the ``kvplug`` script. Dependencies are not resolved (--no-deps): the wheel goes
into a bare virtual environment, where ``kvplug --help`` must still run (the CLI imports vLLM
only inside the commands that need it)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json
from importlib.metadata import distribution, entry_points
d = distribution("kvplug")
print(json.dumps({
    "plugins": {e.name: e.value for e in entry_points(group="vllm.general_plugins")},
    "scripts": {e.name: e.value for e in entry_points(group="console_scripts")},
    "license": d.metadata.get("License-Expression"),
    "location": str(d.locate_file("kvplug")),
}))
"""


def test_wheel_registers_the_plugin_and_the_kvplug_script(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, timeout=120)
    (wheel,) = (tmp_path / "dist").glob("kvplug-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("kvplug/cli/__init__.py", "kvplug/bench/runner.py", "kvplug/connectors/vllm/plugin.py",
              "kvplug/triton_kernels/__init__.py", "kvplug/tiers/ssd_verify.py"):
        assert f in names, f
    assert not any(n.startswith(("tests/", "bench/", "triton_kernels/", "connectors/")) for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=120)
    found = json.loads(subprocess.run([str(py), "-c", PROBE], capture_output=True, text=True, check=True,
                                      cwd=tmp_path, timeout=60).stdout)
    assert found["plugins"] == {"kvplug": "kvplug.connectors.vllm.plugin:register"}
    assert found["scripts"] == {"kvplug": "kvplug.cli:main"}
    assert found["license"] == "Apache-2.0"
    assert str(venv) in found["location"]  # the wheel's copy, not this checkout
    help_text = subprocess.run([str(venv / "bin" / "kvplug"), "--help"], capture_output=True, text=True,
                               check=True, cwd=tmp_path, timeout=60).stdout
    for command in ("serve", "demo", "stats", "verify", "bench"):
        assert command in help_text
