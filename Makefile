# kiln's two commands: `make demo` and `make test`. Both build .venv from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test venv clean system-deps

venv: $(STAMP)

# Debian packages the tests use (graphviz, chromium); a no-op when they are there
system-deps:
	@tools/system-deps.sh

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,transformers-tests,serve,ray,rpc,bench]'
	touch $(STAMP)

# The main job on the bundled example: inspect it, show the optimizer's work, then
# compile it, run it on a seeded input, compare with onnxruntime and time both.
demo: $(STAMP)
	$(VENV)/bin/kiln inspect examples/tiny_cnn.onnx
	@echo
	mkdir -p build
	$(VENV)/bin/kiln optimize examples/tiny_cnn.onnx -o build/tiny_cnn.O2.onnx --level O2
	@echo
	$(PY) examples/demo.py examples/tiny_cnn.onnx

test: $(STAMP) system-deps
	$(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
