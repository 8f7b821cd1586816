# The two commands: `make book` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
NOTEBOOKS := $(sort $(wildcard book/*.ipynb))
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: book test test-portable pytest nbval book-check clean

# pyproject.toml gives lower bounds; constraints.txt the exact versions the book and the tests are checked with.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[book,test]"
	touch $(STAMP)

# Execute every chapter and render HTML into _build/html. Every page is rendered even if a chapter
# fails; a failure is then reported as one line per chapter (file, cell, line, exception) and make
# exits non-zero. The full log is _build/book.log.
book: $(STAMP)
	@mkdir -p _build && rm -rf _build/html/reports
	@echo "executing and rendering every chapter (a few minutes; log: _build/book.log)"
	@$(BIN)/jupyter-book build . --path-output . -W --keep-going 2>&1 | tee _build/book.log \
		| sed -un 's|^.*/\(book/[^/:]*\.ipynb\): Executing notebook.*$$|  executing \1|p' \
		|| { $(BIN)/python book/_build_errors.py _build/book.log _build/html/reports; exit 1; }
	@echo "done: open _build/html/index.html"

test: pytest nbval book-check

pytest: $(STAMP)
	$(BIN)/python -m pytest tests -q

nbval: $(STAMP)
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider -q $(NOTEBOOKS)

# Build the book without executing the notebooks; warnings (broken references, toc) are errors.
# Without execution no cell glues its numbers into the prose, so only that warning is silenced here
# (make book executes, and a missing glue key fails it).
book-check: $(STAMP)
	mkdir -p _build
	sed -e 's/^  execute_notebooks: force/  execute_notebooks: "off"/' \
		-e 's/^  config:$$/  config:\n    suppress_warnings: [mystnb.glue]/' _config.yml > _build/_config_noexec.yml
	grep -q 'execute_notebooks: "off"' _build/_config_noexec.yml
	grep -q 'suppress_warnings: \[mystnb.glue\]' _build/_config_noexec.yml
	$(BIN)/jupyter-book build . --config _build/_config_noexec.yml --path-output _build/noexec -W --keep-going

# make test's pytest and nbval on other CPU kernel paths with one thread. Asserts must not depend on the
# vector unit (AVX2, AVX-512, AVX512-BF16) or the thread count of the machine that wrote them.
test-portable: $(STAMP)
	for cap in default avx2; do \
		echo "== ATEN_CPU_CAPABILITY=$$cap OMP_NUM_THREADS=1"; \
		ATEN_CPU_CAPABILITY=$$cap OMP_NUM_THREADS=1 $(MAKE) --no-print-directory pytest nbval || exit 1; \
	done

clean:
	rm -rf _build

# Read the built book in headless Chromium after `make book` (README: "Checking the rendered book").
# Needs only python3 and Debian's chromium; screenshots go to _build/screenshots.
.PHONY: book-check-browser
book-check-browser:
	$(PYTHON) .ci/book_check_browser.py --html _build/html --screenshots _build/screenshots
