# kiln's two commands: `make demo` and `make test`. Both build .venv from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,transformers-tests]'
	touch $(STAMP)

# The main job on the bundled example: inspect it, check that kiln's IR round-trips
# through ONNX and evaluates to onnxruntime's numbers, then optimize it and check
# the optimized model the same way.
demo: $(STAMP)
	$(VENV)/bin/kiln inspect examples/tiny_cnn.onnx
	@echo
	$(VENV)/bin/kiln check examples/tiny_cnn.onnx --input-shape input=1x3x64x64
	@echo
	mkdir -p build
	$(VENV)/bin/kiln optimize examples/tiny_cnn.onnx -o build/tiny_cnn.O2.onnx --level O2 --explain conv-bn
	@echo
	$(VENV)/bin/kiln check build/tiny_cnn.O2.onnx --input-shape input=1x3x64x64

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
