# whatcar: `make serve` runs the committed model, `make test` runs every test.
# Each target builds the virtualenv it needs, and rebuilds it only when its requirements change.

PYTHON   ?= python3
VENV     ?= .venv
PIP_ARGS ?=
DATA     ?= ../shared/datasets/cars
MODELS   ?= models
LEARNER  ?= $(MODELS)/export.pkl
MODEL_DIR ?= artifacts
# Empty by default: the server's own defaults (and WHATCAR_* variables) apply.
HOST     ?=
PORT     ?=
TRAIN_ARGS ?=
# make export QUANTIZE=int8: an int8 compiled package, kept only if validation top-1 stays within a point.
QUANTIZE ?=
# make export ALSO="other/export.pkl ...": more learners of the same classes and split, served as one ensemble.
ALSO ?=
BENCH_ARGS ?=
FUZZ_SECONDS ?= 60
SOAK_REQUESTS ?= 10000
# make deploy: the folder releases go to (required), how many to keep, the service's EnvironmentFile.
PREFIX   ?=
KEEP     ?= 3
ENV_FILE ?=
DEPLOY_ARGS ?=

PID_FILE ?= $(BUILD)/serve.pid
RAY_ADDRESS ?= auto
SERVE_PY := $(VENV)/serve/bin/python
TRAIN_PY := $(VENV)/train/bin/python
CLIENT_PY := $(VENV)/client/bin/python
BUILD    ?= build

.DEFAULT_GOAL := help
.PHONY: help serve reload rollback classify classify-ray test lint test-serve test-export test-cross test-client test-ray \
        test-deploy train export compile triton bench clean serve-env train-env torchserve-env openvino-env client-env fuzz soak \
        chromium deploy deploy-rollback deploy-status systemd-analyze cxx

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: DATA=$(DATA) LEARNER=$(LEARNER) MODEL_DIR=$(MODEL_DIR) HOST=$(HOST) PORT=$(PORT) PIP_ARGS=$(PIP_ARGS)"

# Tools that pip cannot provide: when COMMAND is missing, install Debian's PACKAGE (as root, with
# apt-get), and otherwise run OTHERWISE: $(call install-missing,COMMAND,PACKAGE,WHAT-FOR,OTHERWISE).
install-missing = command -v $(1) >/dev/null 2>&1 || { \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's $(2) $(3)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(2) >/dev/null; \
	else $(strip $(4)); fi; }

# Every virtualenv is built the same way, from scratch whenever a requirements file it depends on
# changes (never upgraded in place, so a failed install cannot leave a half-changed one behind the
# stamp): $(call build-venv,NAME,REQUIREMENTS-FILE).
define build-venv
rm -rf $(VENV)/$(1)
$(PYTHON) -m venv $(VENV)/$(1)
$(VENV)/$(1)/bin/pip install --quiet --no-input $(PIP_ARGS) -r $(2)
touch $(VENV)/$(1)/.stamp
endef

$(VENV)/serve/.stamp: requirements-serve.txt
	$(call build-venv,serve,requirements-serve.txt)

$(VENV)/train/.stamp: requirements-train.txt
	$(call build-venv,train,requirements-train.txt)

# Test-only: tritonclient and Playwright bring numpy and gevent, which the serve side must never have.
$(VENV)/client/.stamp: requirements/client.txt requirements/test.txt
	$(call build-venv,client,requirements/client.txt)

# Ray and its dependencies (numpy, pandas, pyarrow) never go into the serve venv.
$(VENV)/ray/.stamp: requirements/ray.txt requirements-serve.txt
	$(call build-venv,ray,requirements/ray.txt)

$(VENV)/fuzz/.stamp: requirements/fuzz.txt requirements-serve.txt
	$(call build-venv,fuzz,requirements/fuzz.txt)

$(VENV)/%/.stamp-test: $(VENV)/%/.stamp requirements/test.txt
	$(VENV)/$*/bin/pip install --quiet --no-input $(PIP_ARGS) -r requirements/test.txt
	touch $@

serve-env: $(VENV)/serve/.stamp ## build the serving virtualenv only
train-env: $(VENV)/train/.stamp ## build the training virtualenv only
client-env: $(VENV)/client/.stamp ## build the test-only client virtualenv (tritonclient, Playwright)

serve: $(VENV)/serve/.stamp ## serve $(MODEL_DIR) on http://127.0.0.1:8080 (HOST, PORT to change)
	$(SERVE_PY) -m serve --model-dir $(MODEL_DIR) --pid-file $(PID_FILE) $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

# The running `make serve` loads the version $(MODEL_DIR)/current names, checks it, and switches only if
# every check passes; these print the outcome. Standard library only: no virtualenv needed.
CONTROL := $(PYTHON) -m serve.process.control --pid-file $(PID_FILE) --url http://$(or $(HOST),127.0.0.1):$(or $(PORT),8080)
reload: ## make the running server load $(MODEL_DIR)/current (after `make export`), without a restart
	@$(CONTROL) reload

rollback: ## make the previous version of $(MODEL_DIR) current again, and reload it
	@$(CONTROL) rollback --model-dir $(MODEL_DIR)

classify: $(VENV)/serve/.stamp ## score every photo under IN into OUT (.csv or .jsonl), resumable
	@[ -n "$(IN)" ] && [ -n "$(OUT)" ] || { echo "usage: make classify IN=<folder> OUT=<results.csv|results.jsonl>"; exit 2; }
	$(SERVE_PY) -m serve.classify "$(IN)" "$(OUT)" --model-dir $(MODEL_DIR) $(CLASSIFY_ARGS)

classify-ray: $(VENV)/ray/.stamp ## the same on the Ray cluster at RAY_ADDRESS (default: auto, this machine's)
	@[ -n "$(IN)" ] && [ -n "$(OUT)" ] || { echo "usage: make classify-ray IN=<folder> OUT=<results.csv|results.jsonl> RAY_ADDRESS=<head:6379>"; exit 2; }
	$(VENV)/ray/bin/python -m serve.classify "$(IN)" "$(OUT)" --model-dir $(MODEL_DIR) --ray $(RAY_ADDRESS) $(CLASSIFY_ARGS)

# The committed model's recipe (docs/training.md). Two teachers, each two runs of its own
# --run-seed: from ImageNet weights, 2 head-only epochs and 28 more at 224 px (TRAIN_ARGS) into
# $(MODELS)/teacher-N/base, then 4 epochs at 256 px, the size served, at a lower learning rate
# (FINISH_ARGS) into $(MODELS)/teacher-N. Then the student, distilled from both: the same two
# runs with 20 epochs in the first (STUDENT_ARGS), into $(BASE_LEARNER) and $(LEARNER). A run whose
# learner is already what its arguments, photos and teachers make is skipped; a killed one goes on
# from its last epoch. TEACHERS="artifacts/1 ..." teaches from existing models instead, and
# `make train TEACHER_SEEDS= TEACHERS= STUDENT_ARGS=` is the recipe before distillation.
TEACHER_SEEDS ?= 1 2
TEACHERS ?= $(foreach seed,$(TEACHER_SEEDS),$(MODELS)/teacher-$(seed)/export.pkl)
FINISH_ARGS ?= --size 256 --early-size 256 --epochs 4 --lr 4e-4
STUDENT_ARGS ?= --epochs 20
BASE_LEARNER ?= $(MODELS)/base/export.pkl
train: $(VENV)/train/.stamp ## train two teachers, then the student distilled from them (hours; resumable), write $(LEARNER)
	@set -e; for seed in $(TEACHER_SEEDS); do \
	  $(TRAIN_PY) -m train $(DATA) --out $(MODELS)/teacher-$$seed/base --run-seed $$seed $(TRAIN_ARGS); \
	  $(TRAIN_PY) -m train $(DATA) --out $(MODELS)/teacher-$$seed --run-seed $$seed \
	    --resume $(MODELS)/teacher-$$seed/base/export.pkl $(FINISH_ARGS); \
	done
	$(TRAIN_PY) -m train $(DATA) --out $(dir $(BASE_LEARNER)) $(TEACHER_FLAGS) $(TRAIN_ARGS) $(STUDENT_ARGS)
	$(TRAIN_PY) -m train $(DATA) --out $(dir $(LEARNER)) --resume $(BASE_LEARNER) $(TEACHER_FLAGS) $(FINISH_ARGS)
TEACHER_FLAGS = $(foreach teacher,$(TEACHERS),--teacher $(teacher))

export: $(VENV)/train/.stamp $(VENV)/serve/.stamp cxx ## turn LEARNER into a checked artifact: the next version in MODEL_DIR, made current
	WHATCAR_COMPILE_PYTHON=$(abspath $(SERVE_PY)) $(TRAIN_PY) -m export $(LEARNER) $(foreach learner,$(ALSO),--also $(learner)) --out $(MODEL_DIR) $(if $(QUANTIZE),--quantize $(QUANTIZE))

# AOTInductor compiles the artifact's compiled packages with a C++ compiler at export time (serving
# needs none), under the serve virtualenv's torch, the one that runs them: installed here when
# missing (as root). Without one, the export writes TorchScript only and says so.
# The committed packages are portable AVX2 builds; this builds the same shapes for this machine's CPU
# from the current version's model.pt (docs/runtime.md, "make compile"); PORTABLE=1 builds the portable
# AVX2 ones instead, which stores a version exported with weights inside its packages with its weights once.
compile: $(VENV)/serve/.stamp cxx ## build the current version's compiled packages again for this CPU: a new version, made current
	$(SERVE_PY) -m export.host --model-dir $(MODEL_DIR) $(if $(PORTABLE),--portable)

cxx:
	@$(call install-missing,$${CXX:-g++},g++,for the compiled package,\
	  echo "no C++ compiler: the export writes no compiled package (sudo apt-get install g++)")

triton: $(VENV)/train/.stamp ## add a Triton model repository (MODEL_DIR/current/triton) to the current version
	$(TRAIN_PY) -m export.triton $(MODEL_DIR)

test: lint test-serve test-export test-cross test-client test-ray test-deploy ## run the lint and every test (serve, export, cross-version, clients, Ray, deploy)

# ruff comes with requirements/test.txt; its rules are in pyproject.toml.
lint: $(VENV)/serve/.stamp-test ## check the code with ruff
	$(VENV)/serve/bin/ruff check .

# Tests are grouped by what they test; a group runs under the virtualenv its code runs in. The
# serving venv's: serve/, ops/, bench/'s figures, fuzz/'s corpus, and export/host.py (make compile).
SERVE_TESTS := tests/serve tests/ops tests/bench tests/fuzz tests/export/host
test-serve: $(VENV)/serve/.stamp-test
	$(SERVE_PY) -m pytest $(SERVE_TESTS)

# Its exports compile with the training torch (no WHATCAR_COMPILE_PYTHON), so that test-cross
# proves the older pairing too: packages built by 2.14, served by 2.13.
test-export: $(VENV)/train/.stamp-test cxx
	rm -rf $(BUILD)/cross
	WHATCAR_CROSS_DIR=$(BUILD)/cross $(TRAIN_PY) -m pytest tests/export --ignore=tests/export/host

# The artifact test-export wrote under torch 2.14.1, loaded and scored under the serve side's 2.13.0.
test-cross: $(VENV)/serve/.stamp-test test-export
	WHATCAR_CROSS_DIR=$(BUILD)/cross $(SERVE_PY) -m pytest tests/cross

# A real server from the serve venv, driven from outside by tritonclient and by Debian's Chromium
# through Playwright (apt-get install -y chromium); screenshots land in $(BUILD)/screenshots.
test-client: $(VENV)/client/.stamp $(VENV)/serve/.stamp chromium
	WHATCAR_SERVE_PYTHON=$(SERVE_PY) WHATCAR_SCREENSHOTS=$(BUILD)/screenshots $(CLIENT_PY) -m pytest tests/client

# A head and a worker node of a real Ray cluster on this machine, started and stopped by the tests.
test-ray: $(VENV)/ray/.stamp-test $(VENV)/serve/.stamp
	WHATCAR_SERVE_PYTHON=$(SERVE_PY) $(VENV)/ray/bin/python -m pytest tests/ray

# The deploy tool runs under the system's Python (it builds virtualenvs, so it cannot live in one) and
# builds one release in full; pytest runs from the serve venv, which also makes the tests' tiny models.
test-deploy: $(VENV)/serve/.stamp-test systemd-analyze
	WHATCAR_DEPLOY_PYTHON=$(PYTHON) WHATCAR_DEPLOY_PIP_ARGS="$(PIP_ARGS)" $(SERVE_PY) -m pytest tests/deploy

# The unit files are checked with systemd-analyze verify, installed here when missing (as root).
systemd-analyze:
	@$(call install-missing,systemd-analyze,systemd,for systemd-analyze (the unit file test),\
	  echo "the unit file test needs systemd-analyze: sudo apt-get install systemd"; exit 1)

# pip cannot provide a browser and Playwright's own download needs the open internet, so the browser
# test uses Debian's Chromium, installed here when missing (as root, or ask for it by name).
chromium:
	@[ -n "$$WHATCAR_CHROMIUM" ] || $(call install-missing,chromium,chromium,for the browser test,\
	  echo "the browser test needs Chromium: sudo apt-get install chromium (or set WHATCAR_CHROMIUM)"; exit 1)

# The benchmark's peer server. Optional: if it cannot be built, `make bench` says so and skips it.
$(VENV)/torchserve/.stamp: requirements/torchserve.txt
	$(call build-venv,torchserve,requirements/torchserve.txt)

torchserve-env: $(VENV)/torchserve/.stamp ## build TorchServe 0.12, the benchmark's peer server (needs Java)

# The benchmark's forward-pass reference. Optional too: without it `make bench` says so and skips it.
$(VENV)/openvino/.stamp: requirements/openvino.txt
	$(call build-venv,openvino,requirements/openvino.txt)

openvino-env: $(VENV)/openvino/.stamp ## build OpenVINO 2026.4, the benchmark's forward-pass reference

bench: $(VENV)/serve/.stamp $(VENV)/train/.stamp ## measure serving against its floor, OpenVINO, learn.predict and TorchServe
	$(MAKE) --no-print-directory torchserve-env || echo "bench: no TorchServe environment; the peer comparison is skipped"
	$(MAKE) --no-print-directory openvino-env || echo "bench: no OpenVINO environment; its forward-pass reference is skipped"
	$(SERVE_PY) -m bench --model-dir $(MODEL_DIR) --learner $(LEARNER) $(BENCH_ARGS)

# The corpus grows across runs in $(BUILD)/fuzz/corpus; an input that breaks the check is saved as
# $(BUILD)/fuzz/crash-* and the run stops with an error.
fuzz: $(VENV)/fuzz/.stamp ## fuzz image decoding + preprocessing for FUZZ_SECONDS (default 60) with atheris
	mkdir -p $(BUILD)/fuzz/corpus
	$(VENV)/fuzz/bin/python -m fuzz $(BUILD)/fuzz/corpus -max_total_time=$(FUZZ_SECONDS) -timeout=20 \
	    -rss_limit_mb=2048 -max_len=65536 -artifact_prefix=$(BUILD)/fuzz/ -print_final_stats=1

# A real server on 127.0.0.1 under good and malformed uploads; prints failures, RSS and open fds.
soak: $(VENV)/serve/.stamp ## soak a real server with SOAK_REQUESTS (default 10000) mixed good and bad uploads
	$(SERVE_PY) -m bench.soak --requests $(SOAK_REQUESTS) --model-dir $(MODEL_DIR)

# Releases side by side in PREFIX: see docs/operations.md, "Deploying to a server". Run as the user that owns
# PREFIX (root for /opt/whatcar); the service itself runs as its own user.
deploy: ## build and check a release of this commit in PREFIX, then switch PREFIX/current to it
	@[ -n "$(PREFIX)" ] || { echo "make deploy needs PREFIX=<folder>, for instance: make deploy PREFIX=/opt/whatcar"; exit 2; }
	$(PYTHON) -m deploy release --prefix "$(PREFIX)" --keep $(KEEP)$(if $(ENV_FILE), --env-file "$(ENV_FILE)")$(if $(PIP_ARGS), --pip-args="$(PIP_ARGS)") $(DEPLOY_ARGS)

deploy-rollback: ## switch PREFIX/current back to the release that was current before it
	@[ -n "$(PREFIX)" ] || { echo "make deploy-rollback needs PREFIX=<folder>"; exit 2; }
	$(PYTHON) -m deploy rollback --prefix "$(PREFIX)"

deploy-status: ## list the releases in PREFIX: current, previous, disk use
	@[ -n "$(PREFIX)" ] || { echo "make deploy-status needs PREFIX=<folder>"; exit 2; }
	$(PYTHON) -m deploy status --prefix "$(PREFIX)"

clean: ## remove virtualenvs and build output (keeps artifacts/ and models/)
	rm -rf $(VENV) $(BUILD) .pytest_cache .ruff_cache
