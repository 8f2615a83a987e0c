# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# Your own photos instead of the download (offline too): `make demo DATA=~/my_photos`, a folder with
# one subfolder per class, or train/ and test/ each with one subfolder per class (README: Your photos).
DATA ?=
ifneq ($(strip $(DATA)),)
FOOD_CLASSIFIER_DATA := $(DATA)
endif
FOOD_CLASSIFIER_DATA ?=
export FOOD_CLASSIFIER_DATA
MODEL ?= models/food
MANIFEST ?= data/manifest.csv

.PHONY: demo example test test-fast install lint bench clean proto

$(BIN)/food-classifier: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[serve,train,dev,cache,kafka,grpc,parquet]"
	touch $@

install: $(BIN)/food-classifier

demo: install
	$(BIN)/food-classifier data prepare --manifest data/manifest.csv
	$(BIN)/food-classifier train --manifest data/manifest.csv --models-dir models --name food
	@$(MAKE) --no-print-directory example

# One prediction on the manifest's first test photo. The path is read with the csv module and quoted
# (photos may live under paths with spaces or commas); a failed prediction fails make.
example:
	@echo "--- example prediction ---"
	@img="$$($(BIN)/python -c 'import csv, sys; print(next(r["path"] for r in csv.DictReader(open(sys.argv[1], newline="")) if r["tier"] == "test"))' "$(MANIFEST)")" \
	  && $(BIN)/food-classifier predict --model "$(MODEL)" "$$img"

# Test tiers (markers in pyproject.toml; README: Tests). test-fast: lint + every test that starts no server,
# broker, Ray, podman or browser and trains nothing (minutes); test: test-fast, then the rest (every test).
# pytest exits 5 when a tier selects no test: that is not a failure here.
SERVICES := live or broker or ray or container or browser or slow
PYTEST   := $(BIN)/python -m pytest -q -ra --durations=15

test-fast: lint
	$(PYTEST) -m "not ($(SERVICES))" || [ $$? -eq 5 ]

test: test-fast
	$(PYTEST) -m "$(SERVICES)" || [ $$? -eq 5 ]

lint: install
	$(BIN)/ruff check food_classifier tests bench
	$(BIN)/lint-imports

# After `make demo` (needs models/food and its run): pipeline time, recipes, int8, the service vs the seed.
bench: install
	$(BIN)/python bench/bench_pipeline.py
	$(BIN)/python bench/bench_recipes.py
	$(BIN)/python bench/bench_int8.py --bundle models/food
	$(BIN)/python bench/bench_serving.py --bundle models/food --run $$(ls -d runs/*-efficientnet_lite* | tail -n 1)

clean:
	rm -rf runs models data/manifest.csv data/manifest.report.json

# gRPC stubs from food_classifier/v1/*.proto (ours + the OIP's; grpcio-tools, pinned in the dev extra); tests check they are fresh
proto: install
	$(BIN)/python -m food_classifier.v1.codegen
