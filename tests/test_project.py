"""Project-level checks: pins agree (constraints.txt, environment.yml), entry points and LICENSE, notebooks are stored clean, the book's table of contents
is complete, and chapters import the library instead of re-defining it."""
import ast
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))


def _name(requirement: str) -> str:
    """"torch>=2.6" -> "torch" (PEP 508 names are case-insensitive, - and _ alike)."""
    return re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0).lower().replace("_", "-")


def _constraints() -> dict[str, str]:
    """constraints.txt -> {name: "name==version"}; every line must be an exact pin."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][0-9A-Za-z.]*", line), f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[_name(line)] = line
    return pins


def test_every_dependency_has_a_tested_pin_in_constraints():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _constraints()
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    for requirement in requirements:
        assert "==" not in requirement, f"pyproject.toml pins {requirement!r}: give a lower bound, pin in constraints.txt"
        assert _name(requirement) in pins, f"{requirement!r} has no exact version in constraints.txt"
    for name in ("torch", "torchvision", "numpy"):  # the library's core: a lower bound, not an open range
        bound = next(r for r in project["dependencies"] if _name(r) == name)
        assert ">=" in bound, bound


def test_environment_yml_pins_equal_constraints():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _constraints()
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pins = {r for r in pip_section if not r.startswith("-")}
    wanted = {pins[_name(r)] for r in project["dependencies"] + project["optional-dependencies"]["book"]
              + project["optional-dependencies"]["test"] + project["optional-dependencies"]["tensorboard"]}
    assert conda_pins == wanted, (
        f"only in environment.yml: {sorted(conda_pins - wanted)}; "
        f"only in constraints.txt: {sorted(wanted - conda_pins)}")
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python == "python=3.11" and project["requires-python"] == ">=3.11"


def test_make_installs_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile and "constraints.txt" in makefile.split("$(STAMP):")[1].splitlines()[0]


def test_torch_pins_are_the_machine_ones():
    pins = _constraints()
    assert pins["torch"] == "torch==2.14.1" and pins["torchvision"] == "torchvision==0.29.1"
    book = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["book"]
    assert "jupyter-book>=1.0.4,<2" in book


def test_console_scripts_point_at_main_functions():
    """Every [project.scripts] entry is a main(argv=None) -> int that --help answers with exit 0."""
    import importlib
    import inspect

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"dinolite-train", "dinolite-curate", "dinolite-embed", "dinolite-eval", "dinolite-report"}
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        main = getattr(importlib.import_module(module), function)
        assert list(inspect.signature(main).parameters) == ["argv"], name
        with pytest.raises(SystemExit) as exit_:
            main(["--help"])
        assert exit_.value.code == 0, name
        assert f"`{name}`" in (ROOT / "README.md").read_text(), f"README.md does not list {name}"


def test_license_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == {"text": "Apache-2.0"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        assert "id" in cell, f"{path.name}: a cell has no id"
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, (
                f"{path.name} is stored with outputs; strip it (e.g. jupyter nbconvert "
                f"--clear-output --inplace {path.name})")
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


def _toc_files(entries):
    for entry in entries:
        if "file" in entry:
            yield entry["file"]
        for key in ("chapters", "sections", "parts"):
            yield from _toc_files(entry.get(key, []))


def test_toc_lists_every_page_and_every_page_exists():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"], *_toc_files(toc["parts"])]
    captions = [part["caption"] for part in toc["parts"]]
    for required in ("Foundations", "Objectives", "Training and evaluation", "DINOv3", "Data", "Scale"):
        assert required in captions
    for f in files:
        assert (ROOT / f).with_suffix(".md").exists() or (ROOT / f).with_suffix(".ipynb").exists(), f
    pages = {str(p.relative_to(ROOT).with_suffix("")) for p in (ROOT / "book").glob("*") if p.suffix in (".md", ".ipynb")}
    assert pages == set(files), f"pages not in _toc.yml: {sorted(pages - set(files))}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci/run").read_text()
    assert "make test" in (ROOT / "README.md").read_text() and "make book" in (ROOT / "README.md").read_text()


def _library_names():
    names = set()
    for path in (ROOT / "dinolite").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                names.add(node.name)
    return names


def _notebook_code(path):
    nb = json.loads(path.read_text())
    return [("".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code"]


CHAPTERS = [p for p in NOTEBOOKS if re.match(r"\d\d_", p.name)]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_does_not_redefine_library_functions(path):
    library = _library_names()
    for source in _notebook_code(path):
        tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert node.name not in library, (
                    f"{path.name} defines {node.name!r}, which the library already has: import it "
                    f"(or give a teaching version its own name and compare it with the library's)")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_asserts_its_claims_and_imports_dinolite(path):
    code = "\n".join(_notebook_code(path))
    assert code, f"{path.name} has no code cells"
    assert "import dinolite" in code or "from dinolite" in code
    assert code.count("assert ") >= 3, f"{path.name}: key claims must be asserted"
    # nbval compares the outputs of cells tagged nbval-check-output; a "# NBVAL_CHECK_OUTPUT" comment would
    # do the same but shows on the page, so the tag is the one marker used
    tags = [t for c in json.loads(path.read_text())["cells"] for t in c.get("metadata", {}).get("tags", [])]
    assert "nbval-check-output" in tags, f"{path.name}: print small deterministic results in a checked cell"
    assert "NBVAL_" not in code, f"{path.name}: use the cell tag nbval-check-output, not a comment readers see"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_first_cell_installs_dinolite_only_where_missing(path):
    """Colab opens a chapter without dinolite: its first code cell installs the project from the
    repository in _config.yml, and only when dinolite is not importable (nbval and make book
    must not reinstall)."""
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    first = _notebook_code(path)[0]
    assert 'find_spec("dinolite") is None' in first and f"git+{url}" in first, (
        f"{path.name}: the first code cell must install git+{url} when dinolite is missing")
    assert first.index("find_spec") < first.index("pip")


def test_browser_check_recognises_machine_paths():
    """.ci/book_check_browser.py flags paths of the build machine in outputs, not URLs or made-up paths."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("book_check_browser", ROOT / ".ci/book_check_browser.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = module.machine_paths(ROOT)
    for leaked in ("/tmp/dinolite_ch7_x holds a run", "/root/.cache/torch/hub", "/home/ana/data", f"{ROOT}/book",
                   "/work/wt/x"):
        assert paths.search(leaked), leaked
    for fine in ("https://dl.fbaipublicfiles.com/dinov2/x.pth", "~/.cache/torch/hub/checkpoints", "/nonexistent/x.pth",
                 "<run dir> holds a run"):
        assert not paths.search(fine), fine
