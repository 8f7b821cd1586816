"""The file index of a folder: or list: dataset, built once and reused.

Walking (and verifying) millions of files at every (re)start of every rank takes hours. A run builds the index
once, on rank 0, saves it as RUN/file_index.json, sends it to the other ranks (one broadcast), and a resumed or
requeued run reads the file instead of walking the folder again:

    dataset = indexed_dataset("folder:/data/imagenet22k", run_dir="runs/g14", verify=False)

verify=True opens every image once while indexing and skips those PIL cannot read (train.verify_images);
verify=False only lists the files (a file that then fails to decode is skipped when it is loaded).
"""
import json
import os
from pathlib import Path

import torch.distributed as dist

from dinolite.data.datasets import IMAGE_EXTENSIONS, DataError, ImageFolderDataset, ImageListDataset
from dinolite.data.spec import absolute_spec

INDEX_FILE = "file_index.json"
INDEXED_KINDS = ("folder", "list")


def indexable(spec) -> bool:
    """A folder: or list: spec (or a bare existing directory)."""
    if not isinstance(spec, str):
        return False
    kind = absolute_spec(spec).partition(":")[0]
    return kind in INDEXED_KINDS


def build_index(spec: str, verify: bool) -> dict:
    """{"spec", "verify", "root", "classes", "samples": [[path, label], ...], "skipped": [...]} of a folder:/list: spec."""
    spec = absolute_spec(spec)
    kind, _, path = spec.partition(":")
    if kind == "list":
        dataset = ImageListDataset(path)
    elif verify:
        dataset = ImageFolderDataset(path, verify=True)
    else:
        dataset = _listed_folder(Path(path))
    return {"spec": spec, "verify": verify, "root": str(dataset.root), "classes": list(dataset.classes),
            "samples": [[str(p), label] for p, label in dataset.samples],
            "skipped": [str(p) for p in getattr(dataset, "skipped", [])]}


def _listed_folder(root: Path) -> ImageFolderDataset:
    """An ImageFolderDataset from the file names alone: no image is opened."""
    if not root.is_dir():
        return ImageFolderDataset(root)  # its one-line DataError for a missing folder or a file
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        return ImageFolderDataset(root)  # its one-line DataError for a folder without images
    class_of = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in paths]
    classes = sorted({c for c in class_of if c is not None})
    number = {c: i for i, c in enumerate(classes)}
    return dataset_from_index({"root": str(root), "classes": classes, "skipped": [],
                               "samples": [[str(p), number[c] if c is not None else -1] for p, c in zip(paths, class_of)]},
                              kind="folder")


def dataset_from_index(index: dict, kind: str | None = None) -> ImageFolderDataset:
    """The dataset the index describes, without touching the disk."""
    cls = ImageListDataset if (kind or index["spec"].partition(":")[0]) == "list" else ImageFolderDataset
    dataset = cls.__new__(cls)
    dataset.root, dataset.transform = Path(index["root"]), None
    dataset.samples = [(Path(path), int(label)) for path, label in index["samples"]]
    dataset.classes, dataset.skipped, dataset._failed = list(index["classes"]), [Path(p) for p in index["skipped"]], set()
    return dataset


def _read(path: str, spec: str, verify: bool) -> dict | None:
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    # a verified index also serves a run that does not verify; not the other way round
    return index if index.get("spec") == spec and (index.get("verify") or not verify) else None


def _write(path: str, index: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(index, f)
    os.replace(tmp, path)  # a killed write never leaves half an index


def indexed_dataset(spec: str, run_dir: str | None = None, verify: bool = True, log=print) -> ImageFolderDataset:
    """The folder:/list: dataset of `spec` from RUN/file_index.json when it holds this spec, else indexed on rank 0
    (and saved there); with a process group, rank 0's index is broadcast to every rank."""
    spec = absolute_spec(spec)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    payload = [None]
    if rank == 0:
        try:
            payload = [_index_on_rank_0(spec, run_dir, verify, log)]
        except DataError as error:
            if not distributed:
                raise
            payload = [{"error": str(error)}]  # every rank raises it, none waits forever
    if distributed:
        dist.broadcast_object_list(payload, src=0)
    if "error" in payload[0]:
        raise DataError(payload[0]["error"])
    return dataset_from_index(payload[0])


def _index_on_rank_0(spec: str, run_dir: str | None, verify: bool, log) -> dict:
    path = os.path.join(run_dir, INDEX_FILE) if run_dir else None
    index = _read(path, spec, verify) if path else None
    if index is not None:
        log(f"reusing the file index {path} ({len(index['samples'])} images)")
        return index
    index = build_index(spec, verify)
    if path:
        try:
            os.makedirs(run_dir, exist_ok=True)
            _write(path, index)
        except OSError:
            return index  # the run directory's own check reports it in one line
        log(f"indexed {len(index['samples'])} images of {spec}" + (" (each verified)" if verify else "")
            + f" -> {path}")
    return index
