"""The prose of a chapter never types a number that a cell measures: it inserts it from the cell
with MyST-NB's glue ({glue:text}`name:.1f`, published by dinolite.viz.glue), so the text and the
output it describes cannot disagree. A decimal or a percentage typed in a chapter's markdown must be
a constant listed here with what it is (a hyper-parameter, a paper's figure, a hand-computed value).
Numbers inside maths ($...$), inline code and code blocks are not prose and are not checked.
"""
import json
import re
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
CHAPTERS = sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))

# A decimal (7.2, 0.955) or a percentage (15%, 30 %), not part of a word, a version or a range token.
NUMBER = re.compile(r"(?<![\w.\-/])(\d+(?:\.\d+)?\s?%|\d+\.\d+)(?![\w.]*\w)")
GLUE_ROLE = re.compile(r"\{glue(?::text)?\}`([\w-]+)(?::[^`]*)?`")
GLUE_CALL = re.compile(r"""glue\(\s*["']([\w-]+)["']""")

# chapter -> {typed number: what constant it is}. Anything measured by a cell is glued instead.
ALLOWED = {
    "01": {"0.1": "interpolation offset of the official code", "0.0": "interpolate_offset value",
           "1.0": "LayerScale init of the hub constructors"},
    "02": {"0.32": "crop-scale boundary (hyper-parameter)", "0.5": "flip / blur probability (config)",
           "0.4": "colour-jitter strength (config)", "0.2": "jitter / greyscale / solarisation (config)",
           "0.1": "hue jitter / blur probability (config)", "0.8": "colour-jitter probability (config)",
           "1.0": "blur probability / scale bound (config)", "0.0": "effective blur probability 1 - 1.0",
           "0.9": "effective blur probability 1 - 0.1", "90%": "1 - 0.1, from the config",
           "10%": "0.1 from the config; shape-pixel threshold of an exercise", "0.083": "chance, 1/12",
           "0.66": "uniform mean area (0.32 + 1) / 2"},
    "03": {"0.04": "teacher temperature (config)", "0.07": "teacher temperature (config)",
           "11.09": "ln 65536 (REFERENCE)", "8.318": "ln 4096 (REFERENCE)", "0.9": "centre momentum (config)",
           "0.992": "teacher momentum (config)", "1.0": "final teacher momentum (config)",
           "0.4": "weight decay end (config)", "0.9995": "momentum rule for small batches",
           "0.99": "exercise value"},
    "04": {"1.0": "the uniform share, by definition", "3.5": "computed bound, given in the text",
           "1.2": "exercise threshold"},
    "05": {"10 %": "mask ratio shown", "30 %": "mask ratio shown", "50 %": "mask ratio shown",
           "70 %": "1 - the mask ratio 0.3", "0.607": "toy example, hand-computed", "1.155": "toy example, hand-computed",
           "0.1": "mask-ratio range (config)", "0.5": "mask-ratio range (config)"},
    "06": {"0.1": "KoLeo weight (config)", "90%": "the asserted threshold", "0.003": "KoLeo weight of the toy"},
    "07": {"0.9": "AdamW beta / entropy threshold", "0.999": "AdamW beta", "0.2": "patch-embed lr factor",
           "0.04": "weight decay / temperature (config)", "0.4": "weight decay end (config)",
           "0.992": "teacher momentum (config)", "0.07": "teacher temperature (config)",
           "0.02": "teacher temperature of the recipe", "0.9995": "momentum formula, computed",
           "6.24": "ln 512", "11.09": "ln 65536", "1.28": "ImageNet-1k size, 1.28 M",
           "3.0": "gradient clip (config)", "0.72": "joint-clip factor of the worked example, 30 / |(40, 10, 5)|",
           "1.6": "Lightly's version", "10%": "chance with 10 classes", "0.03": "tiny-cpu's base lr (config)"},
    "08": {"0.1": "similarity advantage in the example", "20 %": "held-out share (protocol)",
           "74.5": "DINO ViT-S/16 kNN (paper)", "77.0": "DINO ViT-S/16 linear (paper)",
           "83.5": "DINOv2 ViT-g/14 kNN (paper)", "86.5": "DINOv2 ViT-g/14 linear (paper)",
           "88.4": "DINOv3 7B linear (paper)", "55.9": "DINOv3 7B ADE20k (paper)", "49.5": "DINOv2 ADE20k (paper)",
           "0.02": "exercise grid", "0.07": "exercise grid", "0.5": "exercise grid",
           "60%": "PhotoMosaics' training columns (definition)", "40%": "PhotoMosaics' held-out columns (definition)"},
    "09": {"55.9": "DINOv3 7B ADE20k (paper)", "49.5": "DINOv2 ADE20k (paper)", "88.4%": "DINOv3 7B linear (paper)",
           "2.0": "Gram loss weight (official config)", "0.999": "teacher momentum of the Gram stage (config)",
           "0.5": "local-crop DINO weight of the Gram stage (official config)",
           "1.5": "Gram weight of the high-resolution stage (official config)",
           "0.6": "the 7B Gram stage's lr relative to its pre-training lr (official configs: 2.4e-4 / 4e-4)"},
    "10": {"88.4%": "DINOv3 7B linear (paper)", "55.9": "DINOv3 7B ADE20k (paper)", "49.5": "DINOv2 ADE20k (paper)",
           "1.689": "LVD-1689M size (paper)", "1.7": "LVD-1689M size, rounded", "0.07": "teacher temperature",
           "1.5": "Gram weight / teacher scale of the high-resolution stage (config)",
           "0.5": "local-crop DINO weight (config)", "0.02": "exercise temperature",
           "0.999": "teacher momentum of the high-resolution stage (official config)"},
    "11": {"1.1": "ViT-g/14 parameters, billions", "6.7": "ViT-7B/16 parameters, billions",
           "10%": "memory the planner keeps free", "0.6": "107 GB / 256 GPUs with two teacher copies, computed",
           "40%": "assumed MFU", "30%": "assumed MFU", "50%": "assumed MFU",
           "0.04": "teacher temperature start (config)", "0.07": "teacher temperature (config)",
           "0.994": "teacher momentum of the 7B pre-training (config)", "0.999": "teacher momentum of the later stages (config)",
           "0.5": "local-crop DINO weight (config)", "1.5": "Gram weight of the high-resolution stage (config)"},
    "12": {"1.2": "DINOv2 pool size, billions (paper)", "0.6": "DINOv2 copy-detection threshold (paper)",
           "1.689": "LVD-1689M size (paper)"},
}


def prose(markdown: str) -> str:
    """The text a reader reads as words: code blocks, inline code, roles and maths removed."""
    text = re.sub(r"(```|~~~).*?\1", " ", markdown, flags=re.S)
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.S)
    text = re.sub(r"\$[^$\n]+\$", " ", text)
    text = re.sub(r"(\{[\w:-]+\})?`[^`\n]+`", " ", text)  # inline code and roles: {glue:text}`x`, {cite}`y`
    return text


def typed_numbers(markdown: str) -> list[str]:
    return NUMBER.findall(prose(markdown))


def bare(number: str) -> str:
    """'74.5 %', '74.5%' and '74.5' are one number for the list of constants."""
    return number.replace(" ", "").rstrip("%")


def markdown_cells(path: Path) -> list[tuple[int, str]]:
    cells = json.loads(path.read_text())["cells"]
    return [(i, "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "markdown"]


def test_detector_finds_a_typed_number_and_skips_glue_maths_and_code():
    assert typed_numbers("the kNN gap was 7.2 points, 15% of it") == ["7.2", "15%"]
    assert typed_numbers("a gap of {glue:text}`knn_gap:.1f` points, $\\tau = 0.04$, `lr=0.5`") == []
    assert typed_numbers("```python\nx = 0.955\n```\nViT-S/16, DINOv2, 1e-5, 10-50") == []


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_no_measured_number_is_typed_into_prose(chapter):
    allowed = {bare(n) for n in ALLOWED.get(chapter.name[:2], {})}
    typed = [(i, n) for i, text in markdown_cells(chapter) for n in typed_numbers(text) if bare(n) not in allowed]
    assert not typed, (
        f"{chapter.name}: numbers typed into prose (markdown cell, number): {typed}. Insert a measured number "
        f"from its cell with dinolite.viz.glue('name', value) and {{glue:text}}`name:.1f`; add a constant "
        f"(hyper-parameter, paper figure) to ALLOWED in {Path(__file__).name} with what it is.")


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_glued_name_in_prose_is_glued_by_a_cell(chapter):
    cells = json.loads(chapter.read_text())["cells"]
    glued = {n for c in cells if c["cell_type"] == "code" for n in GLUE_CALL.findall("".join(c["source"]))}
    used = {n for _, text in markdown_cells(chapter) for n in GLUE_ROLE.findall(text)}
    assert used <= glued, f"{chapter.name}: prose inserts {sorted(used - glued)}, which no cell glues"
