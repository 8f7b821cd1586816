"""book/_build_errors.py: a failed chapter becomes one line naming the file, cell, line and exception."""
import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location("build_errors", Path(__file__).parents[1] / "book" / "_build_errors.py")
build_errors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_errors)

# What myst-nb saves for a failing cell (abridged): nbclient frames the source with 18 dashes, IPython's
# traceback is coloured and starts with a 75-dash line.
REPORT = (
    "Traceback (most recent call last):\n"
    '  File "/somewhere/nbclient/client.py", line 918, in _check_raise_for_error\n'
    "nbclient.exceptions.CellExecutionError: An error occurred while executing the following cell:\n"
    "------------------\n"
    "spread = optimise(koleo_loss, bunched, steps=1000)\n"
    "assert nn_after.min() > 0.5 * optimum\n"
    "------------------\n\n\n"
    "\x1b[31m" + "-" * 75 + "\x1b[39m\n"
    "\x1b[31mAssertionError\x1b[39m                            Traceback (most recent call last)\n"
    "\x1b[32m      1\x1b[39m spread = optimise(koleo_loss, bunched, steps=1000)\n"
    "\x1b[32m----> \x1b[39m\x1b[32m2\x1b[39m \x1b[38;5;28;01massert\x1b[39;00m nn_after.min() > 0.5 * optimum\n\n"
    "\x1b[31mAssertionError\x1b[39m: \n"
)


def test_report_becomes_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "book").mkdir()
    cells = [{"cell_type": "markdown", "source": ["# 6. KoLeo"], "metadata": {}},
             {"cell_type": "code", "source": ["import torch"], "metadata": {}, "outputs": [], "execution_count": None},
             {"cell_type": "code", "source": ["spread = optimise(koleo_loss, bunched, steps=1000)\n",
                                              "assert nn_after.min() > 0.5 * optimum"],
              "metadata": {}, "outputs": [], "execution_count": None}]
    (tmp_path / "book" / "06_koleo.ipynb").write_text(json.dumps({"cells": cells}))
    reports = tmp_path / "_build" / "html" / "reports" / "book"
    reports.mkdir(parents=True)
    (reports / "06_koleo.err.log").write_text(REPORT)
    build_errors.main("_build/book.log", "_build/html/reports")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["error: book/06_koleo.ipynb, cell 3, line 2: assert nn_after.min() > 0.5 * optimum "
                     "-> AssertionError: (traceback: _build/html/reports/book/06_koleo.err.log)"]


def test_other_build_failures_name_the_first_warning(tmp_path, capsys):
    log = tmp_path / "book.log"
    log.write_text("Running Sphinx\n[IPKernelApp] WARNING | Kernel is running over TCP\n"
                   "\x1b[91m/x/book/intro.md:3: WARNING: unknown document: 'nowhere'\x1b[39;49;00m\n")
    build_errors.main(str(log), str(tmp_path / "no-reports"))
    assert capsys.readouterr().out.strip() == (
        f"error: the book build failed: /x/book/intro.md:3: WARNING: unknown document: 'nowhere' (full log: {log})")
