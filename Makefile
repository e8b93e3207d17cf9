# The pipeline, one target per stage; each is a thin call of `python -m pipeline VERB`.
#   make folds train MODEL=resnet18      make predict ensemble      make demo
# Variables: DATA MODEL MODELS FOLDS TTA EPOCHS BUDGET=30 FORCE=1 NAME SEEDS=0,1,2 PARTIAL=1 KEEP_GOING=1 ARGS="key=value ..."
#   make train predict MODELS="resnet18 resnet34 timm/resnet50": each experiment in turn
#   several GPUs: GPUS=4 or GPUS=0,1 [PARALLEL=folds]; several machines: NNODES NODE_RANK MASTER_ADDR MASTER_PORT

.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
DATA ?= digits
MODEL ?= resnet18
MODELS ?=
FOLDS ?=
TTA ?=
EPOCHS ?=
BUDGET ?=
FORCE ?=
# FORCE=1 redoes finished work; every other value is refused here, before anything runs:
# `$(if $(FORCE),--force)` would read FORCE=0 or FORCE=no as "force" and delete finished folds
ifneq ($(filter-out 1,$(FORCE)),)
$(error FORCE=$(FORCE) is not a choice: FORCE=1 redoes finished work; leave FORCE out (or FORCE=) to keep it)
endif
NAME ?=
MESSAGE ?=
TRIALS ?=
PORTFOLIO ?=
TUNE_STORAGE ?=
SEEDS ?=
PARTIAL ?=
KEEP_GOING ?=
ARGS ?=
STEPS ?=
START ?=
END ?=
GPUS ?=
PARALLEL ?=
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?=
MASTER_PORT ?= 29500

RUN = $(PYTHON) -m pipeline
# GPUS=4 (a count) or GPUS=0,1,2,3 (which ones): train and predict start one process per GPU with
# torchrun (python -m torch.distributed.run: the venv's torch), DistributedDataParallel inside.
# One machine: --standalone, torchrun finds a free port. Several: the same command on each machine,
# NNODES=<machines> NODE_RANK=<0..NNODES-1> MASTER_ADDR=<address of NODE_RANK=0> [MASTER_PORT].
# PARALLEL=folds (train): no DDP; one single-process fold per GPU of GPUS, side by side.
comma := ,
NPROC = $(if $(findstring $(comma),$(GPUS)),$(words $(subst $(comma), ,$(GPUS))),$(GPUS))
RENDEZVOUS = $(if $(filter-out 1,$(NNODES))$(MASTER_ADDR),--nnodes=$(NNODES) --node_rank=$(NODE_RANK) \
	--master_addr=$(or $(MASTER_ADDR),$(error NNODES=$(NNODES) needs MASTER_ADDR=<address of the NODE_RANK=0 machine>)) \
	--master_port=$(MASTER_PORT),--standalone)
TORCHRUN = $(if $(findstring $(comma),$(GPUS)),CUDA_VISIBLE_DEVICES=$(GPUS) )$(PYTHON) -m torch.distributed.run \
	--nproc_per_node=$(NPROC) $(RENDEZVOUS) -m pipeline
RUN_GPUS = $(if $(GPUS),$(TORCHRUN),$(RUN))
TRAIN = $(if $(PARALLEL),$(if $(filter folds,$(PARALLEL)),$(RUN) train --parallel folds $(if $(GPUS),--gpus $(GPUS)),\
	$(error PARALLEL=$(PARALLEL): the one mode is PARALLEL=folds)),$(RUN_GPUS) train)
COMMON = --data $(DATA) $(if $(FORCE),--force)
# NAME= names the experiment outright; SEEDS=0,1,2 makes one run per seed (<experiment>-seed<s>)
IDENTITY = $(if $(NAME),--name $(NAME)) $(if $(SEEDS),--seeds "$(SEEDS)")
# train/predict/refit: MODELS="a b c" runs each experiment in turn (KEEP_GOING=1: past a failure)
EXPERIMENTS = $(if $(MODELS),--models "$(MODELS)" $(if $(KEEP_GOING),--keep-going),--model $(MODEL))
# BUDGET=30 (or 45m, 2h): the minutes each fold may train; the epochs that fit are measured
OVERRIDES = $(if $(EPOCHS),train.epochs=$(EPOCHS)) $(if $(BUDGET),train.time_budget=$(BUDGET)) \
	$(if $(TTA),tta.views=$(TTA)) $(ARGS)

.PHONY: help install demo demo-data check folds train predict ensemble refit pseudo runs status audit report bundle cache weights lr tune auto submit lb bench test test-all clean

help: ## list the targets and variables
	@echo "usage: make TARGET [DATA=digits] [MODEL=resnet18] [FOLDS=0,2] [EPOCHS=n | BUDGET=30m] [TTA=d4] [FORCE=1] [ARGS='k=v ...']"
	@echo "       [NAME=my-run] [SEEDS=0,1,2] [MODELS='a b'] [PARTIAL=1] [KEEP_GOING=1]"
	@echo "       train/predict/refit MODELS='resnet18 resnet34 timm/resnet50': each in turn;"
	@echo "       a failure stops there unless KEEP_GOING=1 (the failures are listed at the end)"
	@echo "       several GPUs: GPUS=4 or GPUS=0,1 [PARALLEL=folds]; several machines: NNODES NODE_RANK MASTER_ADDR [MASTER_PORT]"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: ## create .venv and install the package with its test extras
	python3 -m venv .venv
	.venv/bin/pip install -e '.[test]'

demo: ## the whole chain on the embedded digits competition, scored on held-out labels
	$(RUN) demo --model $(MODEL) $(COMMON) $(if $(NAME),--name $(NAME)) $(OVERRIDES)

demo-data: ## export scikit-learn's digits as a Kaggle-style competition in data/digits
	$(RUN) demo-data $(if $(FORCE),--force)

check: ## pre-flight check of the competition's CSVs and images
	$(RUN) check --data $(DATA) $(ARGS)

folds: ## stratified (group) K folds -> folds/<competition>.csv
	$(RUN) folds $(COMMON) $(ARGS)

train: ## train MODEL (or each of MODELS) on each fold (FOLDS=0,2; SEEDS=0,1; GPUS=4) -> runs/DATA/MODEL/fold<k>/
	$(TRAIN) $(EXPERIMENTS) $(if $(FOLDS),--folds "$(FOLDS)") $(COMMON) $(IDENTITY) $(OVERRIDES)

predict: ## TTA inference of each fold's best checkpoint (MODELS=; GPUS=4) -> test_probs.csv, oof_tta.csv
	$(RUN_GPUS) predict $(EXPERIMENTS) $(if $(FOLDS),--folds "$(FOLDS)") $(COMMON) $(IDENTITY) $(OVERRIDES)

ensemble: ## average folds and models (MODELS="a b"; PARTIAL=1) -> submissions/DATA/<name>.csv
	$(RUN) ensemble $(if $(MODELS),--models "$(MODELS)") $(if $(PARTIAL),--partial) --data $(DATA) $(ARGS)

refit: ## train MODEL (MODELS=) on all labelled rows (GPUS=4), predict the test set -> runs/DATA/MODEL/full/
	$(RUN_GPUS) refit $(EXPERIMENTS) $(COMMON) $(IDENTITY) $(OVERRIDES)

pseudo: ## pseudo-label the test set with the current ensemble (MODELS=), train MODEL on it too
	$(RUN) pseudo --model $(MODEL) $(if $(MODELS),--models "$(MODELS)") $(COMMON) $(if $(NAME),--name $(NAME)) $(OVERRIDES)

runs: ## every experiment of DATA: settings, CV, status, submissions -> runs/DATA/leaderboard.*
	$(RUN) runs --data $(DATA) $(ARGS)

status: ## what each stage of MODEL was made from (fingerprints) and whether it is current
	$(RUN) status --data $(DATA) --model $(MODEL) $(if $(NAME),--name $(NAME)) $(ARGS)

audit: ## duplicates, train/test shift (and with MODEL=, label suspects) -> audit/DATA/
	$(RUN) audit --data $(DATA) $(if $(filter command line environment,$(origin MODEL)),--model $(MODEL)) $(if $(FORCE),--force) $(if $(NAME),--name $(NAME)) $(ARGS)

lr: ## a learning-rate sweep of MODEL on fold 0: the curve (lr_sweep.png), a suggested train.lr [STEPS=100 START=1e-7 END=10]
	$(RUN) lr $(COMMON) --model $(MODEL) $(if $(NAME),--name $(NAME)) $(if $(STEPS),--steps $(STEPS)) \
		$(if $(START),--start $(START)) $(if $(END),--end $(END)) $(ARGS)

weights: ## fetch MODEL's pretrained weights ahead (a timm model from the hub) -> OUT (default weights/)
	$(RUN) weights --data $(DATA) --model $(MODEL) $(if $(OUT),--out $(OUT)) $(ARGS)

auto: ## folds, a portfolio of experiments in the time given, the ensemble, the report (BUDGET=2h; PORTFOLIO=file.yaml)
	$(RUN) auto --data $(DATA) $(if $(BUDGET),--budget $(BUDGET)) $(if $(PORTFOLIO),--portfolio $(PORTFOLIO)) \
		$(if $(EPOCHS),train.epochs=$(EPOCHS)) $(if $(TTA),tta.views=$(TTA)) $(ARGS)

tune: ## an Optuna search over MODEL's settings, fold 0 per trial, resumable (TRIALS=20; NAME= for the best; TUNE_STORAGE=<db url>) -> runs/DATA/tune/MODEL/
	$(if $(TUNE_STORAGE),TUNE_STORAGE='$(TUNE_STORAGE)' )$(RUN) tune --data $(DATA) --model $(MODEL) $(if $(NAME),--name $(NAME)) $(if $(TRIALS),--trials $(TRIALS)) $(OVERRIDES)

submit: ## upload the newest current submission (NAME=; MESSAGE=; PARTIAL=1) to Kaggle -> submissions/DATA/leaderboard.csv
	$(RUN) submit --data $(DATA) $(if $(NAME),--name "$(NAME)") $(if $(MESSAGE),--message "$(MESSAGE)") $(if $(PARTIAL),--partial) $(ARGS)

lb: ## fetch the uploads' public/private scores from Kaggle, beside their CV -> submissions/DATA/leaderboard.csv
	$(RUN) lb --data $(DATA) $(ARGS)

report: ## the competition's HTML report: leaderboard, submissions, audit, mistakes as images -> reports/DATA/index.html
	$(RUN) report --data $(DATA) $(if $(FORCE),--force) $(ARGS)

bundle: ## pack the newest current submission (NAME=<submission>; MODELS=) -> bundles/DATA/<name>.zip
	$(RUN) bundle --data $(DATA) $(if $(MODELS),--models "$(MODELS)") $(if $(NAME),--name $(NAME)) $(ARGS)

cache: ## decode and resize every image once (make cache MODEL=m)
	$(RUN) cache --model $(MODEL) $(COMMON) $(ARGS)

bench: ## run the benchmarks, append results to bench/BENCHMARKS.md
	$(PYTHON) -m bench

test: ## the fast test suite
	$(PYTHON) -m pytest -q

test-all: ## every test, the slow end-to-end ones too
	$(PYTHON) -m pytest -q -m ''

clean: ## remove generated folds, runs, submissions, bundles, audits and reports (not data/)
	rm -rf runs pseudo folds/*.csv folds/*.json submissions/*/ bundles audit reports
