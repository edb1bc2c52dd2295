# The two set-up commands of the README: `make demo` and `make test`. Each builds .venv from scratch
# when it is missing (pinned by constraints.txt), so both work on a fresh clone. `make test` also
# installs the offline Kubernetes checks: checkov in its own venv (its pins clash with ours) and
# promtool from Debian's prometheus package (needs root and apt, as on CI), the Node.js client's
# packages (npm ci), and Debian's chromium with playwright-core (npm ci) for the slide viewer's browser test.
# `make docs` builds the documentation site (docs/, mkdocs.yml) into site/ with --strict; `make test` builds it too
# (tests/test_docs.py).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHECKOV_VENV ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed
NODE_STAMP := client/node/node_modules/.installed
BROWSER_STAMP := tests/client/browser/node_modules/.installed

.PHONY: demo test install constraints clean promtool chromium sbom docs

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP) $(CHECKOV_STAMP) $(NODE_STAMP) $(BROWSER_STAMP) promtool chromium
	$(PY) -m ruff check .
	$(PY) -m pytest

install: $(STAMP)

# The documentation site (mkdocs.yml): a broken link or anchor fails the build. Browse it with $(VENV)/bin/mkdocs serve.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt pip
	$(PY) -m pip install --progress-bar off -c constraints.txt -e '.[dev]'
	touch $@

$(CHECKOV_STAMP): constraints-checkov.txt
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet -c constraints-checkov.txt pip
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --progress-bar off -c constraints-checkov.txt checkov
	touch $@

# The Node.js client's dependencies (client/node), exactly as package-lock.json pins them.
$(NODE_STAMP): client/node/package-lock.json
	npm ci --prefix client/node --no-audit --no-fund --loglevel=error
	touch $@

promtool:
	@command -v promtool >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

# The slide viewer's browser test (tests/client/test_slide_view.py): Debian's chromium, driven by
# playwright-core as tests/client/browser/package-lock.json pins it (Playwright's own browser download
# is not used).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

$(BROWSER_STAMP): tests/client/browser/package-lock.json
	npm ci --prefix tests/client/browser --no-audit --no-fund --loglevel=error
	touch $@

# A CycloneDX SBOM per project image (sbom/<Dockerfile stage>.cdx.json), from constraints.txt's pins;
# attach each to its pushed image (cosign attest --type cyclonedx): docs/kubernetes/security.md, "Images".
sbom: $(STAMP)
	$(PY) scripts/sbom.py --out sbom

# Re-pin after changing dependencies in pyproject.toml.
constraints: $(STAMP) $(CHECKOV_STAMP)
	{ echo '# Exact versions CI installs (pip install -c constraints.txt -e ".[dev]"). Regenerate with `make constraints`.'; \
	  $(PY) -m pip freeze --all --exclude-editable | grep -v '^histoserve'; } > constraints.txt
	{ echo '# Exact versions for .venv-checkov (checkov pins packages that clash with the main venv). Regenerate with `make constraints`.'; \
	  $(CHECKOV_VENV)/bin/python -m pip freeze --all; } > constraints-checkov.txt

clean:
	rm -rf runs reports .pytest_cache
