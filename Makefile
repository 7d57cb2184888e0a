# Top-level tasks. `make` (or `make help`) lists them.

# ---- settings (override on the command line: make image IMAGE=foo:dev) ----
IMAGE      ?= tci-sandbox:latest
BASE_IMAGE ?= tci-base:bookworm
ORCH_IMAGE ?= tci-orchestrator:latest
# Extra CA for pip inside `docker build` (intercepting proxies); empty = none.
CA_BUNDLE  ?= $(PIP_CERT)
# 1 = also trust CA_BUNDLE in the final image.
KEEP_CA    ?= 0
DOCKER     ?= docker
# docker compose v2 where present, else Debian's docker-compose 1.29.
COMPOSE    ?= $(shell $(DOCKER) compose version >/dev/null 2>&1 && echo "$(DOCKER) compose" || echo docker-compose)
PYTHON     ?= python3
VENV       ?= .venv
PORT       ?= 8000
# Extra pytest arguments, e.g. make test PYTEST_ARGS="-k pool -x"
PYTEST_ARGS ?=
# Extra `docker build` flags, e.g. DOCKER_BUILD_FLAGS=--no-cache
DOCKER_BUILD_FLAGS ?=

SANDBOX_DIR := sandbox-image
VENV_COPY_FILE := $(SANDBOX_DIR)/.venv-copy
CA_STAGED   := $(SANDBOX_DIR)/ca/ca.pem

# The hardening set sessions run with; used by image-smoke.
SANDBOX_RUN_FLAGS := --rm --init --read-only --user 10001:10001 --cap-drop ALL \
	--security-opt no-new-privileges --network none --pids-limit 256 \
	--memory 2g --memory-swap 2g \
	--tmpfs /tmp:rw,nosuid,nodev,size=256m \
	--tmpfs /home/sandbox:rw,nosuid,nodev,size=256m,uid=10001,gid=10001,mode=0700 \
	--tmpfs /workspace:rw,nosuid,nodev,size=256m,uid=10001,gid=10001,mode=0700 \
	--tmpfs /opt/venv/local:rw,nosuid,nodev,size=256m,uid=10001,gid=10001,mode=0700

SMOKE_IMPORTS := aiohttp, bs4, bokeh, gensim, imageio, joblib, librosa, matplotlib, \
	nltk, numpy, cv2, openpyxl, pandas, plotly, pytest, docx, pytz, requests, skimage, \
	sklearn, scipy, seaborn, soundfile, spacy, textblob, tornado, urllib3, xarray, xlrd, \
	sympy, ipykernel, jupyter_client

.DEFAULT_GOAL := help
.PHONY: help base-image image orchestrator-image image-smoke lock venv test lint up down logs

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

base-image: ## Make sure the base image exists (pull, else debootstrap + import)
	@echo "==> base image $(BASE_IMAGE)"
	BASE_IMAGE=$(BASE_IMAGE) $(SANDBOX_DIR)/base/bootstrap.sh

# With the legacy builder the intermediate stages are untagged <none> images:
# `docker image prune` deletes them, and the next build reinstalls every package.
image: base-image ## Build the sandbox image
	@if [ -n "$(CA_BUNDLE)" ]; then \
		echo "==> staging build-time CA $(CA_BUNDLE) -> $(CA_STAGED) (KEEP_CA=$(KEEP_CA))"; \
		cp "$(CA_BUNDLE)" $(CA_STAGED); \
	else \
		echo "==> no CA_BUNDLE: building without an extra CA"; \
		rm -f $(CA_STAGED); \
	fi
	@echo "==> docker build -t $(IMAGE) $(SANDBOX_DIR)"
	@# A failed build is tried once more with the virtualenv copied afresh (the Dockerfile says why);
	@# the new VENV_COPY is kept, so later builds reuse the good copy from the cache.
	@build() { $(DOCKER) build $(DOCKER_BUILD_FLAGS) \
		--build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg KEEP_CA=$(KEEP_CA) --build-arg VENV_COPY=$$1 \
		-t $(IMAGE) $(SANDBOX_DIR); }; \
	build "$$(cat $(VENV_COPY_FILE) 2>/dev/null || echo 0)" || { \
		copy=$$(date +%s); echo "$$copy" > $(VENV_COPY_FILE); \
		echo "==> the build failed; once more, copying the virtualenv afresh (VENV_COPY=$$copy)"; \
		build "$$copy"; }
	@$(DOCKER) image inspect -f '==> built $(IMAGE): {{.Size}} bytes' $(IMAGE)

image-smoke: ## Import every preinstalled package in the image, hardened and read-only
	$(DOCKER) run $(SANDBOX_RUN_FLAGS) --entrypoint /opt/venv/bin/python $(IMAGE) \
		-c "import $(strip $(SMOKE_IMPORTS)); print('ok')"

lock: ## Regenerate sandbox-image/requirements.lock from requirements.in
	$(SANDBOX_DIR)/lock.sh

$(VENV)/.installed: pyproject.toml sandbox-image/runner/pyproject.toml
	@echo "==> virtualenv $(VENV) with the orchestrator, the runner and the test tools"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]' -e sandbox-image/runner
	@touch $@

venv: $(VENV)/.installed ## Create the development virtualenv

test: venv image orchestrator-image ## Run every test: unit, runner, contract, API, Docker integration, SDK compatibility
	$(VENV)/bin/python -m orchestrator.backends.library $(IMAGE)
	ORCH_TEST_ORCHESTRATOR_IMAGE=$(ORCH_IMAGE) ORCH_TEST_BASE_IMAGE=$(BASE_IMAGE) $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: venv ## ruff and mypy --strict
	$(VENV)/bin/ruff check orchestrator sandbox-image/runner tests bench
	$(VENV)/bin/ruff format --check orchestrator sandbox-image/runner tests bench
	$(VENV)/bin/mypy

orchestrator-image: base-image ## Build the orchestrator image (what `make up` runs; the chaos tests run it too)
	@echo "==> $(COMPOSE) build orchestrator"
	BASE_IMAGE=$(BASE_IMAGE) ORCH_IMAGE=$(ORCH_IMAGE) $(COMPOSE) build orchestrator

up: image orchestrator-image ## Build what is missing, then run the service on 127.0.0.1:$(PORT)
	@echo "==> $(COMPOSE) up -d orchestrator (and the package cache)"
	BASE_IMAGE=$(BASE_IMAGE) ORCH_IMAGE=$(ORCH_IMAGE) SANDBOX_IMAGE=$(IMAGE) ORCH_PORT=$(PORT) CA_BUNDLE=$(CA_BUNDLE) $(COMPOSE) up -d orchestrator
	@echo "==> waiting for http://127.0.0.1:$(PORT)/readyz"
	@for i in $$(seq 120); do \
		if curl -fsS http://127.0.0.1:$(PORT)/readyz >/dev/null 2>&1; then \
			echo "==> ready: try  curl -s http://127.0.0.1:$(PORT)/tci/execute -H 'Authorization: Bearer sk-local' -H 'Content-Type: application/json' -d '{\"code\": \"print(1)\", \"language\": \"python\"}'"; \
			exit 0; \
		fi; sleep 1; \
	done; echo "not ready after 120 s; see: $(COMPOSE) logs orchestrator"; exit 1

down: ## Stop the service and remove its session containers
	$(COMPOSE) down
	@ids=$$($(DOCKER) ps -aq --filter label=io.tci-orchestrator.managed=true \
		--filter label=io.tci-orchestrator.instance=$${ORCH_INSTANCE:-default}); \
	if [ -n "$$ids" ]; then echo "==> removing session containers"; $(DOCKER) rm -f $$ids >/dev/null; fi

logs: ## Follow the service's logs
	$(COMPOSE) logs -f orchestrator

.PHONY: bench
bench: venv image ## Benchmark against the floors and llm-sandbox (BENCH_ARGS=--quick: smoke run; --soak 30: the soak)
	$(VENV)/bin/python -m bench --image $(IMAGE) $(BENCH_ARGS)
