# Two entry points (see README):  make demo   |   make test
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On a machine without an NVIDIA driver, constrain torch to the CPU wheel.
TORCH_CONSTRAINT := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_CONSTRAINT) -e '.[test]'
	@if $(PIP) list 2>/dev/null | grep -qi '^nvidia-' && [ -n "$(TORCH_CONSTRAINT)" ]; then \
	  echo "error: CUDA packages were installed on a CPU machine; see constraints-cpu.txt" >&2; exit 1; fi
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/ftpipe demo

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: setup
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
