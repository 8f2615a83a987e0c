# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# Offline machines: point this at a local ImageFolder, e.g. ../shared/datasets/food101_mini3
FOOD_CLASSIFIER_DATA ?=
export FOOD_CLASSIFIER_DATA

.PHONY: demo test install lint bench clean proto

$(BIN)/food-classifier: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[serve,train,dev]"
	touch $@

install: $(BIN)/food-classifier

demo: install
	$(BIN)/food-classifier data prepare --manifest data/manifest.csv
	$(BIN)/food-classifier train --manifest data/manifest.csv --models-dir models --name food
	@echo "--- example prediction ---"
	$(BIN)/food-classifier predict --model models/food $$(grep -m1 ',test,' data/manifest.csv | cut -d, -f1)

test: install
	$(BIN)/ruff check food_classifier tests bench
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -ra

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
