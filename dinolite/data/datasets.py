"""Datasets on disk: any image folder, a list file of image paths, torchvision datasets already downloaded.

Every dataset returns (image, label) with image a PIL RGB image (or ``transform(image)``)
and label an int (-1 when unknown). The built-in generated datasets are in synthetic.py; the CLI
``--data`` string is parsed by spec.build_dataset.
"""
import math
import warnings
from pathlib import Path

import torch
from PIL import Image

from dinolite.data.augment import to_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """The data cannot be used as asked: a missing or empty folder, a bad --data spec, too few images.

    The message names the problem and the fix in one line; `python -m dinolite.train` prints it as
    `error: ...` and exits with code 2 instead of showing a traceback.
    """


class DataNotFoundError(DataError, FileNotFoundError):
    """A DataError for data that is not on disk (also a FileNotFoundError)."""


class BadImagesError(DataError):
    """More image files went bad after the dataset was indexed (deleted, truncated) than the run may skip."""


def _describe_paths(paths, limit=10) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


# --------------------------------------------------------------------------------------
# Folder of images
# --------------------------------------------------------------------------------------


class ImageFolderDataset(torch.utils.data.Dataset):
    """Every image under `root` (recursive; extensions IMAGE_EXTENSIONS, any case).

    Labels: if images live in first-level subfolders, each subfolder is a class (sorted
    names -> 0, 1, ...); images directly under root get label -1 (unlabelled).
    Files PIL cannot open are skipped when indexing (one warning names them, see
    ``.skipped``); a file that still fails when decoded (e.g. truncated) is warned about
    once and replaced by the next readable image, so training never crashes on it.
    verify=True also runs PIL's cheap ``verify()`` on every file while indexing.
    Files that go bad after indexing (deleted, truncated mid-run) are skipped the same way, each with a
    counted warning, up to ``max_bad_images`` (None: no limit; training sets it from
    train.max_bad_images_fraction), then BadImagesError names them. The replacement is always the next
    readable index, so a run stays reproducible. The count is per process (each DataLoader worker counts
    the files it met).
    """

    max_bad_images: int | None = None
    draft_side = 0  # > 0: JPEGs may be decoded at a reduced size whose shorter side stays >= this (see below)

    def __init__(self, root, transform=None, verify: bool = True):
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise DataNotFoundError(f"image folder {self.root} does not exist; give the path of a directory of "
                                    f"images ({', '.join(IMAGE_EXTENSIONS)}), optionally in one subfolder per class")
        if not self.root.is_dir():
            raise DataError(f"{self.root} is a file; give the path of a directory of images")
        self.transform = transform
        candidates = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not candidates:
            raise DataError(f"no images found under {self.root}; put files ending in "
                            f"{', '.join(IMAGE_EXTENSIONS)} there (searched recursively) or give another folder")
        self.skipped = []
        readable = []
        for path in candidates:
            try:
                with Image.open(path) as image:
                    if verify:
                        image.verify()
                readable.append(path)
            except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                self.skipped.append(path)
        if self.skipped:
            warnings.warn(f"ImageFolderDataset: skipped {len(self.skipped)} unreadable file(s) under {self.root}: "
                          f"{_describe_paths(self.skipped)}", stacklevel=2)
        if not readable:
            raise DataError(f"none of the {len(candidates)} image files under {self.root} could be read "
                            f"(e.g. {candidates[0]}); check that they are complete images")
        class_of = [p.relative_to(self.root).parts[0] if len(p.relative_to(self.root).parts) > 1 else None
                    for p in readable]
        self.classes = sorted({c for c in class_of if c is not None})
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(p, index[c] if c is not None else -1) for p, c in zip(readable, class_of)]
        self._failed = set()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self):
        return len(self.samples)

    def _load(self, path):
        with Image.open(path) as image:
            reduce_while_decoding(image, self.draft_side)
            image.load()
            return to_rgb(image)

    def __getitem__(self, i):
        for offset in range(len(self.samples)):
            path, label = self.samples[(i + offset) % len(self.samples)]
            if path in self._failed:
                continue
            try:
                image = self._load(path)
            except Exception as error:
                self._bad_image(path, error)
                continue
            return (self.transform(image) if self.transform is not None else image), label
        raise BadImagesError(f"no image under {self.root} could be read any more; check the files")

    def _bad_image(self, path, error) -> None:
        self._failed.add(path)
        limit = self.max_bad_images
        if limit is not None and len(self._failed) > limit:
            raise BadImagesError(
                f"{len(self._failed)} image files of {self.root} could not be read during the run, more than the "
                f"{limit} allowed (train.max_bad_images_fraction): {_describe_paths(sorted(map(str, self._failed)))}. "
                "Restore or remove them (and re-index), or raise train.max_bad_images_fraction; then run the same "
                "command again to resume")
        of = f" of at most {limit}" if limit is not None else ""
        warnings.warn(f"ImageFolderDataset: cannot read {path} ({type(error).__name__}: {error}); using the next "
                      f"image instead (bad image {len(self._failed)}{of})")


def reduce_while_decoding(image: Image.Image, min_side: int) -> None:
    """Ask PIL to decode a JPEG at 1/2, 1/4 or 1/8 of its size (the DCT's own scaling, PIL's draft mode) when its
    shorter side stays >= min_side: far less work for a 4000 x 3000 photo cut into 32-224 px crops. Other formats,
    and min_side 0, are decoded whole. Call before image.load()."""
    if not min_side or image.format != "JPEG":
        return
    width, height = image.size
    scale = min_side / min(width, height)
    if scale < 0.5:  # the largest reduction, 1/2, would still leave at least min_side
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))


class ImageListDataset(ImageFolderDataset):
    """The images named in a text file, one per line: ``PATH`` or ``PATH<TAB>LABEL``.

    Relative paths are relative to the list file's folder; blank lines and lines starting with
    ``#`` are skipped. LABEL is an integer class id (-1 or none: unlabelled); ``classes`` are the
    ids as strings, 0 .. max label. ``python -m dinolite.curate`` writes such files. Every listed
    file must exist (checked when the list is read); decoding errors are handled as in
    ImageFolderDataset (one warning, then the next readable image).
    """

    def __init__(self, list_file, transform=None):
        self.root = Path(list_file).expanduser()
        if not self.root.is_file():
            raise DataNotFoundError(f"image list {self.root} does not exist; expected a text file with one image "
                                    "path per line, optionally followed by a tab and an integer label")
        self.transform = transform
        self.samples, self.skipped, self._failed = [], [], set()
        try:
            lines = self.root.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read image list {self.root} ({str(e).splitlines()[0]}); give a text file "
                            "with one image path per line") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip() or line.startswith("#"):
                continue
            path, _, label = line.rstrip("\r\n").partition("\t")
            path = Path(path).expanduser()
            path = path if path.is_absolute() else self.root.parent / path
            if not path.is_file():
                raise DataNotFoundError(f"{self.root} line {number}: image {path} does not exist "
                                        "(relative paths are relative to the list file's folder)")
            try:
                label = int(label) if label.strip() else -1
            except ValueError:
                raise DataError(f"{self.root} line {number}: label {label!r} is not an integer; write "
                                 "PATH<TAB>LABEL with an integer class id, or PATH alone") from None
            self.samples.append((path, label))
        if not self.samples:
            raise DataError(f"image list {self.root} names no images (blank lines and # comments are skipped)")
        self.classes = [str(c) for c in range(max(label for _, label in self.samples) + 1)]


# --------------------------------------------------------------------------------------
# torchvision datasets (already downloaded)
# --------------------------------------------------------------------------------------

_DOWNLOAD_HINTS = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "torchvision.datasets.CIFAR10('{root}', download=True)"),
    "stl10": ("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
              "torchvision.datasets.STL10('{root}', split='train+unlabeled', download=True)"),
    "imagenette": ("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz (or imagenette2-320.tgz, imagenette2.tgz)",
                   "torchvision.datasets.Imagenette('{root}', size='160px', download=True)"),
}


def _missing(name, root, error):
    url, call = _DOWNLOAD_HINTS[name]
    return DataNotFoundError(
        f"{name} not found under {root} ({error}). dinolite never downloads data itself; get it with "
        f"`python -c \"import torchvision; {call.format(root=root)}\"` "
        f"or download and extract {url} into {root}."
    )


class TorchvisionDataset(torch.utils.data.Dataset):
    """Wrap a torchvision dataset so items are (PIL RGB or transform(image), int label)."""

    def __init__(self, base, classes, transform=None):
        self.base, self.classes, self.transform = base, list(classes), transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        image = to_rgb(image)
        return (self.transform(image) if self.transform is not None else image), int(label)


def cifar10(root, train: bool = True, transform=None) -> TorchvisionDataset:
    """CIFAR-10 (32 px, 10 classes) from root (the folder holding cifar-10-batches-py)."""
    import torchvision

    try:
        base = torchvision.datasets.CIFAR10(str(root), train=train, download=False)
    except RuntimeError as error:
        raise _missing("cifar10", root, error) from None
    return TorchvisionDataset(base, base.classes, transform)


def stl10(root, split: str = "train+unlabeled", transform=None) -> TorchvisionDataset:
    """STL-10 (96 px) from root (the folder holding stl10_binary); unlabeled images get label -1."""
    import torchvision

    try:
        base = torchvision.datasets.STL10(str(root), split=split, download=False)
    except RuntimeError as error:
        raise _missing("stl10", root, error) from None
    return TorchvisionDataset(base, base.classes, transform)


def imagenette(root, split: str = "train", size: str | None = None, transform=None) -> TorchvisionDataset:
    """Imagenette (10 ImageNet classes) from root; size "full", "320px" or "160px" (None: the first found)."""
    import torchvision

    sizes = [size] if size is not None else ["160px", "320px", "full"]
    errors = []
    for s in sizes:
        try:
            base = torchvision.datasets.Imagenette(str(root), split=split, size=s, download=False)
        except RuntimeError as error:
            errors.append(f"{s}: {error}")
            continue
        classes = [names[0] for names in base.classes]
        return TorchvisionDataset(base, classes, transform)
    raise _missing("imagenette", root, "; ".join(errors))
