# Two set-up commands: `make repro` and `make test`. Both build .venv if it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: repro test pipeline bench pr-report plots plots-diff clean-venv

$(BIN)/mergeloom: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	grep -v '^fusion-bench==' requirements.lock > $(VENV)/requirements-deps.txt
	$(BIN)/pip install --quiet -r $(VENV)/requirements-deps.txt
	# fusion-bench only for its zero-shot template files (mergeloom/prompts.py): without its
	# heavy dependencies (lightning, transformers, ...), which mergeloom never imports
	$(BIN)/pip install --quiet --no-deps $$(grep '^fusion-bench==' requirements.lock)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# One pipeline at every scale: PIPELINE is a folder holding params.yaml (the embedded default
# here, or presets/<name>). `pipeline` validates the whole params file and (re)writes that
# folder's dvc.yaml; `repro` then runs `dvc repro` there.
PIPELINE ?= .
pipeline: $(BIN)/mergeloom
	$(BIN)/python -m stages.pipeline $(PIPELINE)

# Stage commands call `python`: the venv's, first on PATH. JOBS=N runs independent stages N at a
# time on Dask (`mergeloom repro --jobs N`; README "More than one GPU or machine").
JOBS ?=
repro: pipeline
	cd $(PIPELINE) && PATH="$(CURDIR)/$(BIN):$$PATH" $(if $(JOBS),$(CURDIR)/$(BIN)/mergeloom repro --jobs $(JOBS),$(CURDIR)/$(BIN)/dvc repro)

test: $(BIN)/mergeloom
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -q -m "not gpu"  # slow tests too (ViT-B-32, < 1 min)

# The pull-request report (metric, param and plot diffs vs BASE), as the PR workflow posts it.
BASE ?= main
pr-report: $(BIN)/mergeloom
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m scripts.pr_report --base $(BASE)

# The plots as one page that draws with no network (dvc_plots/index.html; README "Viewing the
# plots"): `make plots` for the workspace, `make plots-diff BASE=main` against a revision.
# CHECK=1 also opens the page in headless Chromium and fails unless every plot drew.
plots: $(BIN)/mergeloom
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m scripts.plots_html $(if $(CHECK),--check)

plots-diff: $(BIN)/mergeloom
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m scripts.plots_html $(BASE) $(if $(CHECK),--check)

bench: $(BIN)/mergeloom
	$(BIN)/python bench/merge_bench.py

clean-venv:
	rm -rf $(VENV)
