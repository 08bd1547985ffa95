# The two set-up commands of the README: `make train` (main job) and `make test`.
PY := .venv/bin/python
RUN ?= runs/default

.venv/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

install: .venv/.installed

train: install
	.venv/bin/mtbert train --config configs/default.yaml --out $(RUN)

test: install
	$(PY) -m pytest

.PHONY: install train test
