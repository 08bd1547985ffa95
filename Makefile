# The two set-up commands of the README: `make train` (main job) and `make test`.
PY := .venv/bin/python
RUN ?= runs/default
# OVERWRITE=1 replaces a run already in $(RUN) (otherwise training into it is refused)
TRAIN_FLAGS := $(if $(filter 1,$(OVERWRITE)),--overwrite,)

.venv/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

.venv/.installed-test: pyproject.toml scripts/install.sh
	bash scripts/install.sh --test
	touch $@ .venv/.installed

install: .venv/.installed

install-test: .venv/.installed-test

train: install
	.venv/bin/mtbert train --config configs/default.yaml --out $(RUN) $(TRAIN_FLAGS)

test: install-test
	$(PY) -m pytest

# Opt-in: the all-mpnet-base-v2 backbone (model.backbone=mpnet-base, configs/base.yaml), ~850 MB on
# disk; idempotent. Neither `make train` nor `make test` needs it.
base: install
	.venv/bin/mtbert install-backbone mpnet-base

.PHONY: install install-test train test base
