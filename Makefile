# Set-up and everyday commands. Every target creates .venv when it is missing,
# so a fresh clone needs only `make train` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Default dataset and run of `make train`; override on the command line, e.g.
# `make train TRAIN_EVENTS=4000 WORKDIR=runs/big TRAIN_ARGS="--config.train.num_steps=200"`.
DATA_DIR ?= data
SPATIAL_SIZE ?= 192
TRAIN_FILE ?= $(DATA_DIR)/train_$(SPATIAL_SIZE).h5
VALID_FILE ?= $(DATA_DIR)/valid_$(SPATIAL_SIZE).h5
TRAIN_EVENTS ?= 2000
VALID_EVENTS ?= 100
CONFIG ?= configs/clusternet.py
WORKDIR ?= runs/clusternet
TRAIN_ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv test test-fast train data bench clean

venv: $(STAMP)

$(STAMP): setup.cfg requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

$(TRAIN_FILE): | $(STAMP)
	mkdir -p $(DATA_DIR)
	$(PY) experiments/make_dataset.py --output=$@ --num_events=$(TRAIN_EVENTS) \
		--spatial_size=$(SPATIAL_SIZE) --seed=0 --workers=2

$(VALID_FILE): | $(STAMP)
	mkdir -p $(DATA_DIR)
	$(PY) experiments/make_dataset.py --output=$@ --num_events=$(VALID_EVENTS) \
		--spatial_size=$(SPATIAL_SIZE) --seed=1 --workers=2

data: $(TRAIN_FILE) $(VALID_FILE)

# Trains (or resumes) the run, then clusters the held-out events and reports ARI,
# purity and efficiency in $(WORKDIR)/evaluation/summary.json.
train: $(STAMP) data
	$(PY) experiments/train.py --config=$(CONFIG) --workdir=$(WORKDIR) \
		--config.data.train_file=$(TRAIN_FILE) --config.data.valid_file=$(VALID_FILE) \
		--config.network_base.spatial_size=$(SPATIAL_SIZE) $(TRAIN_ARGS)
	$(PY) experiments/evaluate.py --workdir=$(WORKDIR) --data=$(VALID_FILE) \
		--output=$(WORKDIR)/evaluation

bench: $(STAMP)
	$(PY) experiments/bench_sparse_conv.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
