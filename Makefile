# Two entry points; each sets up .venv itself on a fresh machine.
#   make demo   export the built-in model, check parity, generate text
#   make test   run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test plugins
setup:
	@scripts/setup_env.sh

demo: setup
	@$(PY) scripts/demo.py

test: setup
	@$(PY) -m pytest -q -rs tests

# GPU kernels ahead of time (no GPU needed): build/plugins/libmtx_kernels.so, and the TensorRT
# plugins when TensorRT_ROOT names a TensorRT >= 10.7 SDK (or headers). See plugins/README.md.
plugins: setup
	@cmake -S plugins -B build/plugins -DPython3_EXECUTABLE=$(abspath $(PY)) $(if $(TensorRT_ROOT),-DTensorRT_ROOT=$(TensorRT_ROOT))
	@cmake --build build/plugins -j
