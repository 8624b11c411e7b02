# mmcurate: one entry point for setup, tests, the demo, lint, packaging and registration.
# `make help` lists the targets. Every target that needs Python runs `setup` first (a no-op once done).

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

# ---------------------------------------------------------------- environment
# The interpreter that creates the venv. Python 3.11 is required (pyproject: >=3.11,<3.12).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LOCK := requirements/lock.txt
LMMS_EVAL_PIN := lmms-eval==0.7.3
# Reinstall only when the pins change: the stamp name carries a hash of pyproject.toml + the lock.
SETUP_HASH := $(shell cat pyproject.toml $(LOCK) 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.setup-$(SETUP_HASH)
# pip/setuptools versions come from the lock so the build backend is reproducible too.
PIP_PIN := $(shell grep -E '^pip==' $(LOCK) 2>/dev/null)
SETUPTOOLS_PIN := $(shell grep -E '^setuptools==' $(LOCK) 2>/dev/null)

# All state of tests and the demo stays inside the checkout (.state/), never in the user's HOME.
STATE := $(CURDIR)/.state
# Ray puts AF_UNIX sockets under RAY_TMPDIR/session_<date>_<pid>/sockets/<name>; Linux caps a socket path at
# 107 bytes and Ray adds ~75, so the in-checkout path is used only when it is short enough; a long checkout
# path falls back to a per-checkout directory under /tmp (hashed, so two checkouts never share it).
RAY_TMPDIR_IN := $(STATE)/ray
RAY_TMPDIR ?= $(shell p='$(RAY_TMPDIR_IN)'; if [ $${#p} -le 36 ]; then echo "$$p"; \
	else echo "/tmp/mmc-ray-$$(printf %s '$(CURDIR)' | sha256sum | cut -c1-8)"; fi)
ISOLATED_ENV := MMCURATE_STATE=$(STATE) HOME=$(STATE)/home TMPDIR=$(STATE)/tmp XDG_CACHE_HOME=$(STATE)/cache \
	XDG_CONFIG_HOME=$(STATE)/config HF_HOME=$(STATE)/hf MPLCONFIGDIR=$(STATE)/mpl \
	TORCH_HOME=$(STATE)/torch RAY_TMPDIR=$(RAY_TMPDIR) \
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0 FLYTE_SDK_LOGGING_LEVEL=30 \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} TOKENIZERS_PARALLELISM=false \
	PYTHONPATH=$(CURDIR) PATH=$(VENV)/bin:$$PATH
STATE_DIRS := $(STATE)/home $(STATE)/tmp $(STATE)/cache $(STATE)/config $(STATE)/hf $(STATE)/mpl $(STATE)/torch $(RAY_TMPDIR)

# ---------------------------------------------------------------- packaging / registration
# VERSION names the registered entities and the image tags. Default: git short SHA, with "-dirty" appended
# when tracked or untracked (not ignored) files differ from HEAD. `make register` refuses a dirty tree
# whatever VERSION says (a registered version must be a commit); `make package` allows it.
GIT_SHA := $(shell git rev-parse --short HEAD 2>/dev/null || echo nogit)
GIT_DIRTY := $(shell git status --porcelain 2>/dev/null | grep -q . && echo -dirty)
VERSION ?= $(GIT_SHA)$(GIT_DIRTY)
REGISTRY ?= ghcr.io/mmcurate
IMAGE_TAG ?= $(VERSION)
IMAGE_CPU ?= $(REGISTRY)/mmcurate-cpu:$(IMAGE_TAG)
IMAGE_GPU ?= $(REGISTRY)/mmcurate-gpu:$(IMAGE_TAG)
IMAGE_VLLM ?= $(REGISTRY)/mmcurate-vllm:$(IMAGE_TAG)
IMAGE_TRAIN ?= $(REGISTRY)/mmcurate-train:$(IMAGE_TAG)
IMAGE_BASE ?= auto
ROLES ?= cpu gpu train vllm
# `default` is the image of tasks without container_image=; it is the cpu image.
IMAGE_ARGS := --image $(IMAGE_CPU) --image cpu=$(IMAGE_CPU) --image gpu=$(IMAGE_GPU) \
	--image vllm=$(IMAGE_VLLM) --image train=$(IMAGE_TRAIN)
PACKAGE_OUT ?= flyte-package.tgz
FLYTE_CONFIG ?= flyte.config
PROJECT ?= flytesnacks
DOMAIN ?= development
PKGS ?= workflows

PYTEST_ARGS ?=
ACTIVATE_ARGS ?=
DOCKERFILES := $(sort $(wildcard containers/*.Dockerfile))

.PHONY: help setup test test-fast demo check-pages lint format package register activate register-dry-run images bench gpu-check lock lock-vllm clean

help: ## List the targets
	@echo "mmcurate targets (variables: VERSION=$(VERSION) REGISTRY=$(REGISTRY) PACKAGE_OUT=$(PACKAGE_OUT)):"
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  make %-17s %s\n", $$1, $$2}'

setup: $(STAMP) ## Create .venv (Python 3.11) with the pinned deps + dev tools; a no-op when up to date

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"need Python 3.11, got {sys.version}"' \
		|| { echo "make setup: set PYTHON=/path/to/python3.11" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c $(LOCK) $(PIP_PIN) $(SETUPTOOLS_PIN)
	@# Editable install = a .pth file (pyproject: package-dir ".") that puts this checkout on sys.path, so pyflyte, python and
	@# pytest all import workflows/tasks/core from the working tree. The lock fixes every transitive version.
	$(PIP) install -c $(LOCK) --no-build-isolation -e '.[dev]'
	@# lmms-eval is the parity reference of core/evals/exact.py (tests only). Its own requirements would move our pins
	@# (it pins wandb 0.25 and ~50 more packages); the scoring functions the tests call import none of them.
	$(PIP) install --no-deps $(LMMS_EVAL_PIN)
	@# the demo's project-made tiny models (deterministic, cached per machine by recipe; `make demo` then only
	@# copies them). CI skips it (MMCURATE_SKIP_PREBUILD=1 in .ci/run): no test needs them prebuilt.
	@if [ -z "$${MMCURATE_SKIP_PREBUILD:-}" ]; then mkdir -p $(STATE_DIRS) && $(ISOLATED_ENV) $(PY) -m core.demo.prebuild; fi
	@rm -f $(VENV)/.setup-*
	@touch $@
	@echo "setup done: $(VENV)"

test: setup ## Run the test suite with all state under .state/ (extra args: PYTEST_ARGS=...)
	@mkdir -p $(STATE_DIRS)
	@echo "pytest $(PYTEST_ARGS)  (HOME, TMPDIR, caches, RAY_TMPDIR=$(RAY_TMPDIR) isolated under .state/; offline)"
	@$(ISOLATED_ENV) $(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup ## The suite without the end-to-end tests marked slow (`-m "not slow"`); extra args: PYTEST_ARGS=...
	@mkdir -p $(STATE_DIRS)
	@$(ISOLATED_ENV) $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup ## Run the demo curation on generated data, CPU, offline (scripts/demo.sh)
	@mkdir -p $(STATE_DIRS)
	$(ISOLATED_ENV) bash scripts/demo.sh

check-pages: setup ## Render the demo's deck pages in headless Chromium, check them, save screenshots (after `make demo`)
	@# Needs Chromium (Debian: apt-get install -y chromium; or CHROMIUM=/path/to/chrome). Screenshots: $${DEMO_OUT:-demo_out}/page_shots/.
	@mkdir -p $(STATE_DIRS)
	@out=$${DEMO_OUT:-demo_out}; rm -rf "$$out/page_shots"; dirs="$$out/run/decks"; [ ! -d "$$out/ablation/decks" ] || dirs="$$dirs $$out/ablation/decks"; \
	$(ISOLATED_ENV) $(PY) scripts/check_pages.py $$dirs --shots "$$out/page_shots"

lint: setup ## ruff check on Python, hadolint on every Dockerfile (threshold: containers/hadolint.yaml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint --config containers/hadolint.yaml $(DOCKERFILES)

format: setup ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

package: setup ## Serialize every workflow/launch plan into $(PACKAGE_OUT), offline (no Docker, no cluster)
	@mkdir -p $(STATE_DIRS)
	$(ISOLATED_ENV) $(VENV)/bin/pyflyte --pkgs $(PKGS) package $(IMAGE_ARGS) --force --output $(PACKAGE_OUT)
	@echo "wrote $(PACKAGE_OUT) (images: $(IMAGE_CPU), $(IMAGE_GPU), $(IMAGE_VLLM), $(IMAGE_TRAIN))"

register: setup ## Register every workflow/launch plan with --version $(VERSION), schedules off (refuses a dirty tree)
	@if [ -n "$(GIT_DIRTY)" ]; then echo "make register: the tree has uncommitted changes (git status);" \
		"commit them first so that version $(VERSION) names a commit" >&2; exit 1; fi
	@# Fast registration (pyflyte's default --copy all): the code travels next to the images, so an image
	@# only needs rebuilding when pins or Dockerfiles change (IMAGE_TAG=... reuses one).
	$(VENV)/bin/pyflyte --config $(FLYTE_CONFIG) register --project $(PROJECT) --domain $(DOMAIN) \
		--version $(VERSION) $(IMAGE_ARGS) $(PKGS)
	@echo "registered $(VERSION); scheduled launch plans stay inactive until \`make activate VERSION=$(VERSION)\`"

activate: setup ## Activate the scheduled launch plans of VERSION (refuses placeholder paths; ACTIVATE_ARGS=--dry-run)
	$(ISOLATED_ENV) $(PY) scripts/activate_schedules.py --config $(FLYTE_CONFIG) --project $(PROJECT) \
		--domain $(DOMAIN) --version $(VERSION) $(ACTIVATE_ARGS)

register-dry-run: setup ## Serialize exactly what `make register` would send, without contacting a cluster
	@mkdir -p $(STATE_DIRS)
	$(ISOLATED_ENV) $(VENV)/bin/pyflyte --config $(FLYTE_CONFIG) register --dry-run --copy none \
		--project $(PROJECT) --domain $(DOMAIN) --version $(VERSION) $(IMAGE_ARGS) $(PKGS)

images: ## Build the cpu, gpu, train and vllm images with podman, each running its smoke stage (IMAGE_BASE=auto|local|REF)
	@# Not part of CI (minutes and GBs per image). IMAGE_BASE=auto: the public python image when it can be pulled,
	@# else a local Debian bookworm base (containers/local_base.sh: debootstrap + podman import). ROLES=cpu selects.
	REGISTRY=$(REGISTRY) IMAGE_TAG=$(IMAGE_TAG) IMAGE_BASE=$(IMAGE_BASE) IMAGE_LOG_DIR=$(STATE)/image-logs \
		bash containers/build_images.sh $(ROLES)

bench: setup ## Run every benchmark in benchmarks/ (each prints its headline ratio last)
	@mkdir -p $(STATE_DIRS)
	@shopt -s nullglob; for b in benchmarks/*.py; do echo "== $$b"; $(ISOLATED_ENV) $(PY) $$b | tail -n 1; done

# On the borrowed GPU machine (torch, transformers, timm, pyarrow, pandas preinstalled; no venv there):
# `make gpu-check PY=python`. SMOKE=1 runs the tiny CPU mode that CI runs (tests/unit/test_gpu_check.py).
GPU_CHECK_OUT ?= gpu_check.md
gpu-check: ## GPU check (SigLIP2 img/s + MFU, perplexity batched vs naive, k-means 1M x 1152, generation); SMOKE=1: CPU
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/gpu_check.py $(if $(SMOKE),--smoke) --out $(GPU_CHECK_OUT)

lock: ## Regenerate requirements/lock.txt from the current .venv (after changing a pin)
	@{ echo "# Reproducible transitive versions: \`pip freeze --all\` of the reference venv, minus mmcurate itself."; \
	   echo "# Used as a constraints file (pip install -c requirements/lock.txt ...). Regenerate with \`make lock\`."; \
	   $(PIP) freeze --all --exclude mmcurate | LC_ALL=C sort -f; } > $(LOCK).new && mv $(LOCK).new $(LOCK)

lock-vllm: setup ## Regenerate requirements/lock-vllm.txt: PyPI's resolution of the vllm image (needs PyPI)
	@# No pip config/find-links/extra indexes: resolve against PyPI alone, as the image build does (no local wheel dirs or
	@# machine-wide caps). --dry-run --report reads wheel metadata only; nothing is installed.
	tmp=$$(mktemp -d); \
	$(PY) containers/pins.py vllm > $$tmp/requirements.txt; \
	$(PY) containers/pins.py vllm --base-lock > $$tmp/constraints.txt; \
	env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
		$(PIP) install --dry-run --ignore-installed --quiet --report $$tmp/report.json \
		-r $$tmp/requirements.txt -c $$tmp/constraints.txt; \
	{ echo "# The vllm image's transitive versions: pip's resolution of \`containers/pins.py vllm\` on PyPI,"; \
	  echo "# constrained by requirements/lock.txt minus vLLM's own torch stack. Regenerate with \`make lock-vllm\`."; \
	  $(PY) containers/pins.py vllm --from-report $$tmp/report.json; } > requirements/lock-vllm.txt; \
	rm -rf $$tmp; echo "wrote requirements/lock-vllm.txt"

clean: ## Remove test/demo state and the package (keeps .venv)
	rm -rf $(STATE) $(PACKAGE_OUT) .pytest_cache .ruff_cache
