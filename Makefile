# The pipeline, one target per stage; each is a thin call of `python -m pipeline VERB`.
#   make folds train MODEL=resnet18      make predict ensemble      make demo
# Variables: DATA MODEL MODELS FOLDS TTA EPOCHS FORCE=1 ARGS="key=value ..."

.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
DATA ?= digits
MODEL ?= resnet18
MODELS ?=
FOLDS ?=
TTA ?=
EPOCHS ?=
FORCE ?=
ARGS ?=

RUN = $(PYTHON) -m pipeline
COMMON = --data $(DATA) $(if $(FORCE),--force)
OVERRIDES = $(if $(EPOCHS),train.epochs=$(EPOCHS)) $(if $(TTA),tta.views=$(TTA)) $(ARGS)

.PHONY: help install demo demo-data check folds train predict ensemble refit cache bench test test-all clean

help: ## list the targets and variables
	@echo "usage: make TARGET [DATA=digits] [MODEL=resnet18] [FOLDS=0,2] [EPOCHS=n] [TTA=d4] [FORCE=1] [ARGS='k=v ...']"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: ## create .venv and install the package with its test extras
	python3 -m venv .venv
	.venv/bin/pip install --upgrade pip
	.venv/bin/pip install -e '.[test]'

demo: ## the whole chain on the embedded digits competition, scored on held-out labels
	$(RUN) demo --model $(MODEL) $(COMMON) $(OVERRIDES)

demo-data: ## export scikit-learn's digits as a Kaggle-style competition in data/digits
	$(RUN) demo-data $(if $(FORCE),--force)

check: ## pre-flight check of the competition's CSVs and images
	$(RUN) check $(COMMON) $(ARGS)

folds: ## stratified (group) K folds -> folds/folds.csv
	$(RUN) folds $(COMMON) $(ARGS)

train: ## train MODEL on each fold (FOLDS=0,2 for some) -> runs/MODEL/fold<k>/
	$(RUN) train --model $(MODEL) $(if $(FOLDS),--folds $(FOLDS)) $(COMMON) $(OVERRIDES)

predict: ## TTA inference of each fold's best checkpoint -> test_probs.csv, oof_tta.csv
	$(RUN) predict --model $(MODEL) $(if $(FOLDS),--folds $(FOLDS)) $(COMMON) $(OVERRIDES)

ensemble: ## average folds and models (MODELS="a b") -> submissions/<name>.csv
	$(RUN) ensemble $(if $(MODELS),--models "$(MODELS)") $(COMMON) $(ARGS)

refit: ## train MODEL on all labelled rows, predict the test set -> runs/MODEL/full/
	$(RUN) refit --model $(MODEL) $(COMMON) $(OVERRIDES)

cache: ## decode and resize every image once (make cache MODEL=m)
	$(RUN) cache --model $(MODEL) $(COMMON) $(ARGS)

bench: ## run the benchmarks, append results to bench/BENCHMARKS.md
	$(PYTHON) -m bench

test: ## the fast test suite
	$(PYTHON) -m pytest -q

test-all: ## every test, the slow end-to-end ones too
	$(PYTHON) -m pytest -q -m ''

clean: ## remove generated folds, runs and submissions (not data/)
	rm -rf runs folds/*.csv submissions/*.csv submissions/*.md
