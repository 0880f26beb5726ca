# Two commands do all set-up on a fresh machine:
#   make run   - serve the default model (Gemma 3 270M, bundled) on http://127.0.0.1:8000
#   make test  - run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pagedserve-installed
PROMPT ?= The capital of France is
SERVE_ARGS ?=

.PHONY: install run generate test lint bench

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/pagedserve serve $(SERVE_ARGS)

generate: install
	$(VENV)/bin/pagedserve generate "$(PROMPT)" --max-tokens 64

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check pagedserve tests

bench: install
	$(VENV)/bin/pagedserve bench throughput --input-len 256 --output-len 128 --num-prompts 64
