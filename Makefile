# Two commands for a fresh machine: `make demo` (set up + main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= gemma-3-270m
OUT    ?= build/ko-phone

.PHONY: setup demo test test-fast clean

$(BIN)/koedge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[export,models,test]'
	touch $(BIN)/koedge

setup: $(BIN)/koedge

demo: setup
	$(BIN)/koedge build --model $(MODEL) --recipe phone-3gb --out $(OUT)
	$(BIN)/koedge run $(OUT) "대한민국의 수도는" --max-new-tokens 48 --repetition-penalty 1.2

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf build .pytest_cache
