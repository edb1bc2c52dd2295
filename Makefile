# The two set-up commands of the README: `make demo` and `make test`. Each builds .venv from scratch
# when it is missing (pinned by constraints.txt), so both work on a fresh clone.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install constraints clean

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt pip
	$(PY) -m pip install --progress-bar off -c constraints.txt -e '.[dev]'
	touch $@

# Re-pin after changing dependencies in pyproject.toml.
constraints: $(STAMP)
	{ echo '# Exact versions CI installs (pip install -c constraints.txt -e ".[dev]"). Regenerate with `make constraints`.'; \
	  $(PY) -m pip freeze --all --exclude-editable | grep -v '^histoserve'; } > constraints.txt

clean:
	rm -rf runs reports .pytest_cache
