# Two commands: `make demo` runs the main job end to end, `make test` runs the tests.
# Both create .venv at the repo root and install what they need (pinned by constraints.txt).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: venv test test-all demo bench gpu-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e ".[all,dev]"
	touch $@

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: venv
	$(BIN)/python -m pytest -q --runslow $(PYTEST_ARGS)

demo: venv
	$(BIN)/lightning-supernet demo

bench: venv
	$(BIN)/python benchmarks/bench_core.py --quick
	$(BIN)/python benchmarks/bench_search.py
	$(BIN)/python benchmarks/bench_fork_join.py

gpu-check: venv
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache
