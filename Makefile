# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv if it is missing and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := runs/demo
# The demo trains the tiny open_clip config from scratch on CPU, so it takes larger steps than
# the real recipe (which fine-tunes pretrained CLIP at lr 1e-4, CLIP at lr x 1e-3).
DEMO_EXTRACT_FLAGS ?= --epochs 3 --batch-size 64 --lr 1e-3 --clip-lr-scale 1 --fps uniform
DEMO_GENERATOR_FLAGS ?= --epochs 5 --lr 1e-3

.PHONY: demo demo-table test test-fast install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/diffret demo-data $(DEMO)/data
	$(BIN)/diffret extract --dataset msrvtt --data-root $(DEMO)/data --out $(DEMO)/cache \
		--model tiny --pretrained none $(DEMO_EXTRACT_FLAGS) --overwrite
	$(BIN)/diffret train-generator --cache $(DEMO)/cache --out $(DEMO)/generator $(DEMO_GENERATOR_FLAGS) --overwrite
	$(BIN)/diffret evaluate --cache $(DEMO)/cache --generator $(DEMO)/generator --steps 50 \
		--json $(DEMO)/metrics.json

# The README's demo results: rows discriminative, diffusion, dsl, qbnorm, in and out of domain,
# mean +- std over 3 seeds (about 10 minutes on 2 idle CPU cores).
demo-table: $(STAMP)
	$(BIN)/python benchmarks/demo_table.py --out runs/demo-table --seeds 0,1,2

test: $(STAMP)
	$(BIN)/python -m pytest tests

# Everything but the tests marked slow (end-to-end runs, full-size models): under a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

clean:
	rm -rf runs .pytest_cache
