# harp-vllm developer entry points (see README.md).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test lint compose-test

setup:            ## virtualenv + package (CPU vLLM) + SmolLM2 and Gemma 3 270M prepared in the model cache
	bash scripts/setup.sh

quickstart: setup ## set up, then the main job: SmolLM2's WikiText-2 test perplexity
	$(BIN)/harp-vllm eval ppl --model smollm2-135m --seq-len 2048 --max-windows 16

test:             ## ruff, mypy, then the whole test suite (unit tests and real-model/vLLM tests); prints the 15 slowest
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q --durations=15

lint:
	$(BIN)/ruff check .
	$(BIN)/mypy

compose-test:     ## the compose stack in containers (podman; root): build, model-prep, servers, gateway, Prometheus, load test, restarts, down. Not part of `test`
	bash scripts/compose_test.sh
