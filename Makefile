# Set-up is one stamp file: it is rebuilt only when pyproject.toml changes, so a second
# `make demo` or `make test` starts at once.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.specedge-installed
# llama.cpp's default -march=native build segfaults on CPUs with AMX (see docs/chat.md, "Install").
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
# A CPU build of torch where no NVIDIA GPU is present; users with one get pip's default.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
DEMO_PROMPT ?= Here is one sentence about the sea:

.PHONY: demo test setup clean tmux

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -e ".[hub,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/specedge chat --prompt "$(DEMO_PROMPT)" --max-tokens 64 --temperature 0

# The gates first (lint, format, types: seconds), then the suite.
test: $(STAMP) tmux
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest -q

# The chat REPL is tested in a real terminal under tmux; install it where it is missing.
tmux:
	@command -v tmux >/dev/null 2>&1 || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y tmux; }

clean:
	rm -rf $(VENV)
