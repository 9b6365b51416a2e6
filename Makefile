# bert-recipes: every target creates/refreshes the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build by default; for GPUs: make install TORCH="torch --index-url <your CUDA wheel index>"
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp

RECIPE ?= recipes/pretrain/tiny.yaml
ARGS ?=
TASK ?=
MODEL ?=
PYTEST_ARGS ?=

.PHONY: install pretrain finetune glue test bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

pretrain: $(STAMP)
	$(BIN)/bert-recipes pretrain $(RECIPE) $(ARGS)

finetune: $(STAMP)
	$(BIN)/bert-recipes finetune $(if $(FT_RECIPE),$(FT_RECIPE),$(if $(TASK),recipes/glue/$(TASK).yaml,recipes/glue/sample.yaml)) $(if $(MODEL),model.name_or_path=$(MODEL)) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/pipeline.py

clean:
	rm -rf runs .pytest_cache .hypothesis benchmarks/out
