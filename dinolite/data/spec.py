"""The --data spec: one string naming a dataset ("builtin:n=2000,size=32", "folder:PATH", "cifar10:ROOT", ...)."""
import os

from dinolite.data.datasets import DataError, ImageFolderDataset, ImageListDataset, cifar10, imagenette, stl10
from dinolite.data.synthetic import SyntheticShapes, SyntheticTextures


DATA_SPEC_FORMS = (
    "builtin  |  builtin:n=2000,size=64,seed=0,style=plain   (SyntheticShapes, no download; style full|plain)",
    "textures |  textures:n=2000,size=32,seed=0   (SyntheticTextures, 12 gray pattern classes, no download)",
    "folder:PATH  or an existing directory PATH   (images, optionally one subfolder per class)",
    "list:FILE    (one image path per line, optionally TAB + integer label; paths relative to FILE's folder)",
    "cifar10:ROOT   (torchvision CIFAR-10 already downloaded under ROOT)",
    "stl10:ROOT     (torchvision STL-10 train+unlabeled under ROOT)",
    "imagenette:ROOT (torchvision Imagenette under ROOT)",
)


def _spec_error(spec, problem):
    forms = "; ".join(" ".join(form.split()) for form in DATA_SPEC_FORMS)
    return DataError(f"bad --data spec {spec!r}: {problem}. Valid forms: {forms}")


def _parse_options(spec: str, arg: str, defaults: dict, choices: dict) -> dict:
    """"n=2000,size=32" -> defaults updated; integer options, or one of choices[key]."""
    options = dict(defaults)
    kind = spec.partition(":")[0]
    for item in filter(None, arg.split(",")):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in options:
            raise _spec_error(spec, f"unknown {kind} option {item!r} (options: {', '.join(options)})")
        if key in choices:
            if value not in choices[key]:
                raise _spec_error(spec, f"{kind} {key} must be one of {', '.join(choices[key])}, got {value!r}")
            options[key] = value
            continue
        try:
            options[key] = int(value)
        except ValueError:
            raise _spec_error(spec, f"{kind} option {key} must be an integer, got {value!r}") from None
    return options


def build_dataset(spec: str, transform=None, train: bool = True, return_mask: bool = False):
    """Dataset from a --data spec string (see DATA_SPEC_FORMS).

    train selects the training split of torchvision datasets (STL-10: train+unlabeled; False:
    test). return_mask applies to builtin only.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _spec_error(spec, "empty")
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    if kind == "builtin":
        o = _parse_options(spec, arg, {"n": 10000, "size": 64, "seed": 0, "style": "full"},
                           {"style": SyntheticShapes.styles})
        return SyntheticShapes(num_images=o["n"], image_size=o["size"], seed=o["seed"],
                               transform=transform, return_mask=return_mask, style=o["style"])
    if kind == "textures":
        o = _parse_options(spec, arg, {"n": 10000, "size": 32, "seed": 0}, {})
        return SyntheticTextures(num_images=o["n"], image_size=o["size"], seed=o["seed"], transform=transform)
    if kind in ("folder", "list", "cifar10", "stl10", "imagenette"):
        if not arg:
            raise _spec_error(spec, f"{kind} needs a path after the colon")
        root = os.path.expanduser(arg)
        if kind == "folder":
            return ImageFolderDataset(root, transform=transform)
        if kind == "list":
            return ImageListDataset(root, transform=transform)
        if kind == "cifar10":
            return cifar10(root, train=train, transform=transform)
        if kind == "stl10":
            return stl10(root, split="train+unlabeled" if train else "test", transform=transform)
        return imagenette(root, split="train" if train else "val", transform=transform)
    if os.path.isdir(os.path.expanduser(spec)):
        return ImageFolderDataset(os.path.expanduser(spec), transform=transform)
    raise _spec_error(spec, "not a known dataset kind and not an existing directory")


DATA_SPEC_FILE = "data.txt"  # in a run directory: the --data spec it was trained on (dinolite-report reads it)
_PATH_KINDS = ("folder", "list", "cifar10", "stl10", "imagenette")


def absolute_spec(spec: str) -> str:
    """The spec with its path made absolute (folder:photos -> folder:/home/me/photos), so it holds from any cwd."""
    kind, colon, arg = spec.strip().partition(":")
    if colon and kind in _PATH_KINDS and arg:
        return f"{kind}:{os.path.abspath(os.path.expanduser(arg))}"
    if not colon and os.path.isdir(os.path.expanduser(spec.strip())):
        return f"folder:{os.path.abspath(os.path.expanduser(spec.strip()))}"
    return spec.strip()


def write_data_spec(run_dir: str, data) -> None:
    """Record a run's --data spec in RUN/data.txt (nothing for a dataset object: it has no spec)."""
    if isinstance(data, str) and run_dir:
        with open(os.path.join(run_dir, DATA_SPEC_FILE), "w") as f:
            f.write(absolute_spec(data) + "\n")


def read_data_spec(run_dir: str) -> str | None:
    """The --data spec recorded in RUN/data.txt, or None."""
    path = os.path.join(run_dir, DATA_SPEC_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        spec = f.read().strip()
    return spec or None
