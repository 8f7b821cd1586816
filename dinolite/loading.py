"""One backbone from whatever a user points at: the `--checkpoint` of dinolite-embed, dinolite-eval, dinolite-report.

    load_backbone("runs/tiny")                        # a dinolite run: its exported teacher (or newest checkpoint)
    load_backbone("runs/tiny@50")                     # that run's checkpoint of step 50 (the EMA teacher)
    load_backbone("runs/distill")                     # a distillation run: its main student's EMA backbone
    load_backbone("runs/distill/small/backbone_official.pth")   # another student (config.yaml one folder up)
    load_backbone("runs/g14")                         # a scale/ run: its teacher_backbone_official*.pth
    load_backbone("export.pth", config="tiny-cpu")    # an official-layout file and the recipe it was trained with
    load_backbone("dinov2_vits14")                    # a hub name: the file in torch.hub's cache (never downloaded)
    load_backbone("dinov2_vits14_pretrain.pth")       # an official file: its name or its tensor shapes give the model

Every problem is a LoadError with one line that names what to do. Loading is strict (dinolite.hub.load_official).
"""
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from dinolite.hub import (
    DINOV3_ARCHS,
    HUB_MODELS,
    build_hub_model,
    hub_filename,
    hub_url,
    load_official,
    official_to_dinolite,
)
from dinolite.models import VisionTransformer
from dinolite.checkpoint import list_checkpoints, parse_run_at_step
from dinolite.train.config import Config, apply_overrides, config_from_dict, parse_students
from dinolite.train.recipes import get_config
from dinolite.train.meta_arch import build_backbone

_SCALE_EXPORT = re.compile(r"^teacher_backbone_official_(\d+)\.pth$")


class LoadError(ValueError):
    """A checkpoint source that cannot be loaded; the message is one line naming the fix."""


@dataclass
class Backbone:
    """A loaded backbone (eval mode) and how to rebuild it.

    image_size: the resolution it was trained at (the recipe's global crop size; 224 for hub models).
    config: the run's Config (None for a hub model). description: one line, what was loaded from where.
    kind: "dinolite", "distillation", "scale", "file" or "hub".
    """
    model: VisionTransformer
    image_size: int
    description: str
    kind: str
    config: Config | None = None
    hub_name: str | None = None

    def at_init(self, seed: int = 0) -> VisionTransformer:
        """The same architecture at its random initialisation (seeded): the baseline of an evaluation."""
        torch.manual_seed(seed)
        model = build_hub_model(self.hub_name) if self.hub_name else build_backbone(self.config)
        return model.eval()


def read_run_config(path: str | os.PathLike) -> Config:
    """A run's config.yaml; a scale/ run's `dist:` section (process layout, not the model) is ignored."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise LoadError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path} is not a config (a mapping of sections)")
    data.pop("dist", None)
    try:
        return config_from_dict(data)
    except ValueError as e:
        raise LoadError(f"{path}: {str(e).splitlines()[0]}") from None


def _named_config(name: str) -> tuple[Config | None, str | None]:
    """--config: a hub name (-> (None, name)), a recipe or a YAML file (-> (Config, None))."""
    if name in HUB_MODELS:
        return None, name
    if os.path.isfile(name):
        return read_run_config(name), None
    try:
        return get_config(name), None
    except ValueError as e:
        raise LoadError(f"--config: {str(e).splitlines()[0]} (or a hub name such as dinov2_vits14)") from None


def _read(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a file it cannot read
        raise LoadError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'})") from None
    if not isinstance(state, dict):
        raise LoadError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _hub_name_of(path: str, state: dict) -> str | None:
    """The hub model an official file belongs to: by its released file name, else by its tensor shapes."""
    base = os.path.basename(path)
    for name in HUB_MODELS:
        if base == hub_filename(name):
            return name
    shapes = {official_to_dinolite(k): tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    for name in HUB_MODELS:
        with torch.device("meta"):  # shapes only, no memory
            expected = {k: tuple(v.shape) for k, v in build_hub_model(name).state_dict().items()}
        if shapes == expected:
            return name
    return None


def _load_into(model: VisionTransformer, state: dict, path: str) -> VisionTransformer:
    try:
        load_official(model, state)
    except ValueError as e:
        lines = str(e).splitlines()
        detail = "; ".join(line.strip() for line in lines[1:4])
        raise LoadError(f"{path} does not fit its config ({detail}{'; ...' if len(lines) > 4 else ''}): "
                        "pass --config with the recipe or YAML it was trained with") from None
    return model.eval()


def _from_checkpoint_file(path: str, state: dict, config: str | None, student: str) -> Backbone:
    """A dinolite training checkpoint (its EMA teacher) or a distillation checkpoint (a student's EMA)."""
    cfg = config_from_dict(state["config"]) if config is None else _named_config(config)[0]
    step = state.get("step", "?")
    if "emas" in state:  # distillation: the students' EMA copies
        configs = {"student": cfg, **{n: apply_overrides(cfg, o) for n, o in parse_students(cfg.teacher.students)}}
        if student not in configs:
            raise LoadError(f"{path} has no student {student!r}; its students: {', '.join(configs)}")
        backbone = {k: v for k, v in state["emas"][student].items() if k.startswith("backbone.")}
        model = _load_into(build_backbone(configs[student]), backbone, path)
        return Backbone(model, configs[student].crops.global_size, f"{path} (student {student!r}, EMA, step {step})",
                        "distillation", configs[student])
    model = _load_into(build_backbone(cfg), state, path)
    return Backbone(model, cfg.crops.global_size, f"{path} (EMA teacher, step {step})", "dinolite", cfg)


def _official_file_config(path: str, state: dict) -> tuple[Config | None, str | None, str]:
    """(config, hub name, kind) for an official-layout file without --config: config.yaml beside it (a dinolite
    or scale/ export), one folder up (a distillation student), or the hub model its name or shapes match."""
    folder = Path(path).resolve().parent
    if (folder / "config.yaml").is_file():
        return read_run_config(folder / "config.yaml"), None, "scale" if _is_scale_run(folder) else "file"
    if (folder.parent / "config.yaml").is_file():  # RUN/<student>/backbone_official.pth of a distillation run
        cfg = read_run_config(folder.parent / "config.yaml")
        students = dict(parse_students(cfg.teacher.students))
        if folder.name in students:
            return apply_overrides(cfg, students[folder.name]), None, "distillation"
        if folder.name == "student":
            return cfg, None, "distillation"
    name = _hub_name_of(path, state)
    if name is None:
        raise LoadError(f"{path} holds backbone weights but no config, and there is no config.yaml beside it: pass "
                        "--config with its recipe, YAML file or hub name (e.g. dinov2_vits14)")
    return None, name, "hub"


def _from_file(path: str, config: str | None, student: str) -> Backbone:
    state = _read(path)
    if "config" in state and ("teacher" in state or "emas" in state):
        return _from_checkpoint_file(path, state, config, student)
    if config is not None:
        cfg, name = _named_config(config)
        kind = "hub" if name else "file"
    else:
        cfg, name, kind = _official_file_config(path, state)
    if name is not None:
        with torch.device("meta"):
            model = build_hub_model(name)
        model.to_empty(device="cpu")  # every tensor is overwritten by the strict load
        return Backbone(_load_into(model, state, path), 224, f"{path} ({name})", kind, hub_name=name)
    return Backbone(_load_into(build_backbone(cfg), state, path), cfg.crops.global_size, path, kind, cfg)


def _is_scale_run(folder: Path) -> bool:
    if any(p.name.startswith("dcp_") for p in folder.iterdir()):
        return True
    try:
        return "dist" in (yaml.safe_load((folder / "config.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError):
        return False


def _from_run(run: str, step: int | None, config: str | None, student: str) -> Backbone:
    folder = Path(run)
    if not (folder / "config.yaml").is_file():
        raise LoadError(f"{run} is a directory without config.yaml: give a run directory of dinolite-train or "
                        "scale/train.py, or a checkpoint file")
    if _is_scale_run(folder):
        exported = sorted((int(m.group(1)), p.name) for p in folder.iterdir() if (m := _SCALE_EXPORT.match(p.name)))
        if step is not None:
            name = dict(exported).get(step)
            if name is None:
                raise LoadError(f"{run} has no teacher_backbone_official_{step:08d}.pth: export that step first with "
                                f"python -m scale.export {run} --step {step}")
        elif (folder / "teacher_backbone_official.pth").is_file():
            name = "teacher_backbone_official.pth"
        elif exported:
            name = exported[-1][1]
        else:
            raise LoadError(f"{run} is a scale/ run with DCP checkpoints only: export its teacher first with "
                            f"python -m scale.export {run}")
        backbone = _from_file(str(folder / name), config, student)
        backbone.kind = "scale"
        return backbone
    cfg = read_run_config(folder / "config.yaml")
    distill = bool(cfg.teacher.checkpoint)
    if step is not None:
        found = dict(list_checkpoints(run))
        if step not in found:
            kept = ", ".join(str(s) for s in found) or "none"
            raise LoadError(f"{run} has no checkpoint of step {step} (kept steps: {kept})")
        return _from_file(found[step], config, student)
    exported = folder / student / "backbone_official.pth" if distill else folder / "teacher_backbone_official.pth"
    if exported.is_file():
        backbone = _from_file(str(exported), config, student)
        backbone.kind = "distillation" if distill else "dinolite"
        backbone.description = f"{exported} (the run's {'student ' + repr(student) if distill else 'teacher'} export)"
        return backbone
    found = list_checkpoints(run)
    if not found:
        raise LoadError(f"{run} holds no checkpoint yet (no checkpoint_<step>.pth, no {exported.name}); let the run "
                        "save one (train.checkpoint_every) or give another run")
    return _from_file(found[-1][1], config, student)


def _from_hub_cache(name: str) -> Backbone:
    file = Path(torch.hub.get_dir()) / "checkpoints" / hub_filename(name)
    if not file.is_file():
        where = ("after accepting Meta's DINOv3 licence (facebookresearch/dinov3)" if name in DINOV3_ARCHS
                 else f"from {hub_url(name)}")
        raise LoadError(f"no weights for {name} at {file}; dinolite never downloads: get {hub_filename(name)} {where} "
                        "and save it there, or pass the file as --checkpoint")
    backbone = _from_file(str(file), name, "student")
    backbone.description = f"{name} ({file.name} from the torch.hub cache)"
    return backbone


def load_backbone(source: str, config: str | None = None, student: str = "student") -> Backbone:
    """The backbone `source` names (see the module docstring), in eval mode on the CPU.

    config: a recipe, YAML file or hub name for an official-layout file that has no config.yaml beside it.
    student: which student of a distillation run ("student" is the main one).
    """
    source = os.path.expanduser(str(source))
    run, step = parse_run_at_step(source)
    if step is not None and os.path.isdir(run):
        return _from_run(run, step, config, student)
    if os.path.isdir(source):
        return _from_run(source, None, config, student)
    if os.path.isfile(source):
        return _from_file(source, config, student)
    if source in HUB_MODELS:
        return _from_hub_cache(source)
    raise LoadError(f"checkpoint {source!r} not found: give a run directory (RUN or RUN@STEP), a .pth file, or a hub "
                    f"name ({', '.join(HUB_MODELS[:2])}, ..., {HUB_MODELS[-1]})")
