# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv if it is missing and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := runs/demo
# The demo's settings, written once: `make demo` and benchmarks/demo_table.py (which reads them
# from here) both use them; the data sizes are `diffret demo-data`'s defaults. The demo trains the
# tiny open_clip config from scratch on CPU, so it takes larger steps than the real recipe (which
# fine-tunes pretrained CLIP at lr 1e-4, CLIP at lr x 1e-3). Why these values, with their
# measured spread: docs/benchmarks.md, "The demo as an instrument".
DEMO_EXTRACT_FLAGS ?= --model tiny --pretrained none --recipe modern --epochs 16 --frames 8 --batch-size 64 \
	--lr 1e-3 --clip-lr-scale 1 --fps uniform
DEMO_GENERATOR_FLAGS ?= --epochs 5 --lr 1e-3
DEMO_EVAL_FLAGS ?= --steps 50 --top-k 32
DEMO_SEEDS ?= 0,1,2,3,4

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
		$(DEMO_EXTRACT_FLAGS) --overwrite
	$(BIN)/diffret train-generator --cache $(DEMO)/cache --out $(DEMO)/generator $(DEMO_GENERATOR_FLAGS) --overwrite
	$(BIN)/diffret evaluate --cache $(DEMO)/cache --generator $(DEMO)/generator $(DEMO_EVAL_FLAGS) \
		--json $(DEMO)/metrics.json
	$(BIN)/diffret index --cache $(DEMO)/cache
	$(BIN)/python -c 'import csv; rows = list(csv.DictReader(open("$(DEMO)/data/MSRVTT_JSFUSION_test.csv"))); \
		open("$(DEMO)/queries.txt", "w").write("".join(r["sentence"] + "\n" for r in rows[:2])); \
		[print("example search %d: %r describes %s" % (i + 1, r["sentence"], r["video_id"])) for i, r in enumerate(rows[:2])]'
	$(BIN)/diffret search --cache $(DEMO)/cache --generator $(DEMO)/generator --split test -k 5 \
		--queries $(DEMO)/queries.txt
	@echo "search the demo collection in your browser (http://127.0.0.1:8080/):"
	@echo "  $(BIN)/diffret serve --cache $(DEMO)/cache --generator $(DEMO)/generator"

# The README's demo results: rows discriminative, diffusion, dsl, qbnorm, in and out of domain,
# mean +- std over the training seeds DEMO_SEEDS (the data fixed); resumable.
demo-table: $(STAMP)
	$(BIN)/python benchmarks/demo_table.py --out runs/demo-table --seeds $(DEMO_SEEDS) \
		--extract-flags "$(DEMO_EXTRACT_FLAGS)" --generator-flags "$(DEMO_GENERATOR_FLAGS)" \
		--eval-flags "$(DEMO_EVAL_FLAGS)"

test: $(STAMP)
	bash tests/ensure_browser.sh
	$(BIN)/python -m pytest tests

# Everything but the tests marked slow (end-to-end runs, full-size models): under a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

clean:
	rm -rf runs .pytest_cache
