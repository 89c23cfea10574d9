# The two commands of the README. Both create .venv (if missing) and install everything they need.
#   make demo   fetch sample CTs, pre-train MiM, write the reconstruction montage
#   make test   run the whole test suite
# GPU users: make demo TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo
STAMP := $(VENV)/.mimslicer-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-test.txt
	@$(PYTHON) -c 'import sys; assert (3,10) <= sys.version_info[:2] <= (3,12), "MiMSlicer needs Python 3.10-3.12, found " + sys.version.split()[0]'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check -e . -r requirements-test.txt
	touch $(STAMP)

demo: $(STAMP)
	PYTHONUTF8=1 $(PY) -m engine demo --out $(DEMO_OUT)

test: $(STAMP)
	PYTHONUTF8=1 $(PY) -m pytest -q Testing

clean:
	rm -rf $(VENV) runs .pytest_cache
