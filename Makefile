# The two commands: `make book` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
NOTEBOOKS := $(sort $(wildcard book/*.ipynb))

.PHONY: book test pytest nbval book-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[book,test]"
	touch $(STAMP)

# Execute every chapter and render HTML into _build/html.
book: $(STAMP)
	$(BIN)/jupyter-book build . --path-output . -W --keep-going

test: pytest nbval book-check

pytest: $(STAMP)
	$(BIN)/python -m pytest tests -q

nbval: $(STAMP)
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider -q $(NOTEBOOKS)

# Build the book without executing the notebooks; warnings (broken references, toc) are errors.
book-check: $(STAMP)
	mkdir -p _build
	sed 's/^  execute_notebooks: force/  execute_notebooks: "off"/' _config.yml > _build/_config_noexec.yml
	grep -q 'execute_notebooks: "off"' _build/_config_noexec.yml
	$(BIN)/jupyter-book build . --config _build/_config_noexec.yml --path-output _build/noexec -W --keep-going

clean:
	rm -rf _build

# Read the built book in headless Chromium after `make book` (README: "Checking the rendered book").
# Needs only python3 and Debian's chromium; screenshots go to _build/screenshots.
.PHONY: book-check-browser
book-check-browser:
	$(PYTHON) .ci/book_check_browser.py --html _build/html --screenshots _build/screenshots
