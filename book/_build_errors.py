"""Turn a failed `make book` into one readable line per failing chapter.

Usage: python book/_build_errors.py BUILD_LOG REPORTS_DIR

myst-nb saves the traceback of every notebook that failed to execute as REPORTS_DIR/<chapter>.err.log.
For each one this prints `error: book/<chapter>.ipynb, cell N, line L: <source line> -> <exception>`,
with N the cell's position in the notebook (1 = first cell), so the reader can open the chapter
and go straight to the assert. Anything else that failed the build (a broken reference, say) is
reported by its first warning line. Exits 0: the Makefile decides the exit status.
"""
import json
import re
import sys
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*)$")
FAILING_LINE = re.compile(r"^-+>\s*(\d+)\s?(.*)$")


def parse_report(text: str) -> dict:
    """The failing cell's source, the line number and text of the failing line, and the exception."""
    text = ANSI.sub("", text)
    parts = re.split(r"^-{18}$\n?", text, maxsplit=2, flags=re.MULTILINE)  # nbclient frames the cell source
    source = parts[1].rstrip("\n") if len(parts) >= 3 else ""
    traceback = parts[2] if len(parts) >= 3 else text
    line_number, line_text, exception = None, "", ""
    for line in traceback.splitlines():
        if match := FAILING_LINE.match(line.strip()):
            line_number, line_text = int(match.group(1)), match.group(2).strip()
        if match := EXCEPTION_LINE.match(line.strip()):
            exception = match.group(1)
    return {"source": source, "line": line_number, "line_text": line_text, "exception": exception}


def find_cell(source: str, chapter_stem: str) -> tuple[str, int | None]:
    """(notebook path, 1-based cell position) of the code cell whose source is `source`."""
    for notebook in sorted(Path("book").glob(f"{chapter_stem}.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        for position, cell in enumerate(cells, start=1):
            if cell["cell_type"] == "code" and "".join(cell["source"]).rstrip("\n") == source:
                return str(notebook), position
        return str(notebook), None
    return f"book/{chapter_stem}.ipynb", None


def main(build_log: str, reports_dir: str) -> None:
    reports = sorted(Path(reports_dir).rglob("*.err.log")) if Path(reports_dir).is_dir() else []
    for report in reports:
        failure = parse_report(report.read_text(errors="replace"))
        notebook, cell = find_cell(failure["source"], report.name.removesuffix(".err.log"))
        where = notebook + (f", cell {cell}" if cell else "")
        if failure["line"] is not None:
            where += f", line {failure['line']}: {failure['line_text']}"
        print(f"error: {where} -> {failure['exception'] or 'the cell raised an error'} (traceback: {report})")
    if not reports:
        log = ANSI.sub("", Path(build_log).read_text(errors="replace")) if Path(build_log).is_file() else ""
        warnings = [line.strip() for line in log.splitlines() if re.search(r": (WARNING|ERROR):", line)]
        first = warnings[0] if warnings else "no warning found"
        print(f"error: the book build failed: {first} (full log: {build_log})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
