# Two commands for a fresh machine: `make demo` (set up + main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= gemma-3-270m
OUT    ?= build/ko-phone

.PHONY: setup demo test test-fast test-jvm apk clean

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
	$(MAKE) test-jvm

# The phone demo's JVM unit tests (engine; the Activity's Robolectric tests run from tests/test_android_app.py,
# which hands them a bundle). Maven downloads Kotlin, onnxruntime and Robolectric's framework jar from Maven Central.
test-jvm:
	cd android-demo && mvn -q -B test

# A signed debug APK of the demo (needs the Debian tools named in docs/android.md; not part of `make test`).
apk:
	android-demo/tools/build-apk.sh

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf build .pytest_cache
	-cd android-demo && mvn -q clean
