# emdsl — the two commands for a fresh machine are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo lab test test-python test-notebooks docs bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Runtime + notebook extras: enough for the demo (the PNG needs matplotlib) and for JupyterLab.
$(VENV)/.demo-deps: pyproject.toml | $(VENV)/bin/python
	$(PIP) -e ".[notebook]"
	touch $@

# Everything the suite needs: test and docs extras, a Jupyter kernel for this
# environment, Debian's chromium and the widget JavaScript from npm.
$(VENV)/.test-deps: pyproject.toml tools/install-test-deps.sh | $(VENV)/bin/python
	$(PIP) -e ".[test,docs]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (emdsl)" > /dev/null
	tools/install-test-deps.sh $(PY)
	touch $@

demo: $(VENV)/.demo-deps
	$(PY) -m emdsl.demo --output demo-output/faithful.png

# The tutorials in JupyterLab, with this environment as the kernel (ipykernel's built-in python3).
lab: $(VENV)/.demo-deps
	$(PY) -m jupyterlab notebooks/

test: $(VENV)/.test-deps
	$(MAKE) --no-print-directory test-python test-notebooks docs

test-python: $(VENV)/.test-deps
	$(PY) -m pytest --doctest-modules emdsl tests

test-notebooks: $(VENV)/.test-deps
	$(PY) -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider notebooks
	$(PY) -m pytest --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg \
		-p no:cacheprovider $(shell cat notebooks/strict.txt)

docs: $(VENV)/.test-deps
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

bench: $(VENV)/.test-deps
	$(PY) benchmarks/bench_gmm.py

clean:
	rm -rf $(VENV) docs/_build demo-output .cache
