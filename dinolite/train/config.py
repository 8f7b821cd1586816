"""Training configuration: plain nested dataclasses, YAML files, CLI overrides, validation.

A `Config` holds every number a run depends on. The named recipes are in dinolite.train.recipes:

    cfg = get_config("tiny-cpu")                        # a named recipe (see recipes.RECIPES)
    cfg = load_config("my_run.yaml")                    # or a YAML file (same nesting)
    cfg = apply_overrides(cfg, ["optim.base_lr=0.001", "model.depth=6"])

Overrides use dotted keys and are parsed to the field's type; an unknown key or a value
that does not parse is a ValueError naming the key (and suggesting close matches).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field

import yaml


@dataclass
class ModelConfig:
    """The ViT backbone (arguments of dinolite.models.VisionTransformer)."""

    img_size: int = 224  # size the learned position embedding is built for
    patch_size: int = 14
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    ffn: str = "mlp"  # "mlp", "swiglu" (DINOv2 layout) or "swiglu64" (DINOv3)
    ffn_ratio: float = 4.0
    num_register_tokens: int = 0
    pos_embed: str = "learned"  # "learned" or "rope"
    layerscale_init: float = 1e-5  # 0 disables LayerScale
    drop_path_rate: float = 0.3  # uniform over blocks (DINOv2)
    drop_path_mode: str = "subset"  # "subset" (official: the branch runs on int(B(1-p)) samples) or "mask"
    norm_eps: float = 0.0  # LayerNorm eps; 0: by layout, 1e-5 for "rope" (DINOv3), 1e-6 for "learned" (DINOv2)
    qkv_bias: bool = True  # False in the DINOv3 7B
    mask_k_bias: bool = False  # DINOv3: no bias on the keys (a bias_mask buffer)
    untie_local_cls_norm: bool = False  # DINOv3 7B: a separate LayerNorm for the local crops' CLS token
    rope_shift_coords: float = 0.0  # RoPE training augmentations (0: off); DINOv3 7B: rescale 2 only
    rope_jitter_coords: float = 0.0
    rope_rescale_coords: float = 0.0


@dataclass
class HeadConfig:
    """DINO ([CLS]) and iBOT (patch) projection heads."""

    dino_out_dim: int = 65536  # K, number of prototypes
    ibot_out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_layers: int = 3
    share_heads: bool = False  # True: one head for DINO and iBOT (DINOv2 small configs)
    ibot_hidden_dim: int = 0  # 0: hidden_dim (DINOv3 7B: 4096 vs 8192 for the DINO head)
    ibot_bottleneck_dim: int = 0  # 0: bottleneck_dim (DINOv3 7B: 384 vs 512)
    weight_norm_last_layer: bool = True  # DINOv2; DINOv3 uses a plain linear prototype layer


@dataclass
class LossConfig:
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    # DINOv3 Gram anchoring slot: weight 0 in DINOv2 pre-training (not implemented here).
    centering: str = "sinkhorn_knopp"  # or "softmax_center"
    center_momentum: float = 0.9  # softmax_center only
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # final teacher temperature
    warmup_teacher_temp: float = 0.04  # start of the linear warm-up
    warmup_teacher_temp_epochs: float = 30


@dataclass
class CropConfig:
    """Multi-crop augmentation and iBOT masking."""

    global_size: int = 224
    local_size: int = 98
    n_local: int = 8
    global_scale_min: float = 0.32
    local_scale_max: float = 0.32
    local_scale_min: float = 0.05
    # Gaussian blur sigma range in pixels of the crop (DINOv2: 0.1-2.0 on 224 px crops).
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 2.0
    mask_probability: float = 0.5  # fraction of global crops that get a mask
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.5
    mask_ratio_mode: str = "uniform"  # "uniform" in each bin (DINOv2) or the bin's upper edge (DINOv3)
    complete_masks: bool = False  # DINOv3: fill each mask up to its exact target with random patches
    flip_probability: float = 0.5  # horizontal flips (DINOv3 7B: none)
    # Mixed crop sizes (DINOv3 high-resolution adaptation): "G:L:p,G:L:p,..." (global size, local size,
    # probability); each step draws one pair, the same on every rank. "": always global_size / local_size.
    size_pairs: str = ""


@dataclass
class OptimConfig:
    base_lr: float = 0.004  # scaled by optim.scaling_rule (DINOv2: sqrt(global_batch / 1024))
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    clip_grad: float = 3.0  # 0 disables clipping
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_epochs: float = 1
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    # the peak lr = base_lr x rule(global batch): sqrt_1024 (DINOv2), sqrt_1024_x4 (DINOv3), linear_256, none
    scaling_rule: str = "sqrt_1024"
    # "cosine": warm-up, then cosine to min_lr (DINOv2); "constant": warm-up, then the peak (DINOv3 7B);
    # "cosine_rise": a cosine from 0 up to the peak over warmup_epochs, then the peak (DINOv3 high-res stage)
    lr_schedule: str = "cosine"


@dataclass
class TrainConfig:
    batch_size: int = 64  # images per step on one process (global batch = batch_size * world)
    epochs: int = 100
    epoch_length: int = 1250  # steps per "epoch" (DINOv2 uses a fixed 1250); 0: len(dataset) // batch
    seed: int = 0
    precision: str = "bf16"  # "bf16" (autocast, losses in fp32), "fp32", or "auto" (dinolite.train.precision)
    device: str = "auto"  # "auto": cuda when available, else cpu
    num_workers: int = 8
    threads: int = 0  # compute threads of the training process; 0: auto, the cores the data workers leave
    checkpoint_every: int = 1000  # steps; the last step is always saved
    keep_last: int = 3
    log_every: int = 10  # steps between metrics.jsonl lines
    monitor_every: int = 100  # steps between collapse-monitor lines (0: never)
    knn_every: int = 0  # steps between kNN evaluations (0: only at the end, when labels exist)
    knn_k: int = 20
    knn_train_size: int = 0  # 0: the whole dataset; else the first n images
    knn_test_size: int = 0  # held-out images for kNN (built-in dataset: a different seed)
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True  # also write TensorBoard event files to RUN/tensorboard when tensorboard is installed
    max_nonfinite: int = 3  # skip a step whose loss or gradient is not finite; stop after this many in a row
    max_bad_images_fraction: float = 0.001  # images unreadable mid-run are skipped up to this fraction (>= 1 image)
    minutes: float = 0.0  # > 0: a wall-clock budget; the step count is fixed from the measured step time
    knn_data: str = ""  # labelled --data spec of the kNN's held-out images (e.g. folder:~/photos/val); "": auto
    verify_images: bool = True  # folder:/list: data: open and PIL-verify every image once, when the index is built
    wandb: str = ""  # a Weights & Biases project name: also log there (needs `pip install wandb`)


@dataclass
class GramConfig:
    """DINOv3 Gram anchoring: the student's patch-similarity (Gram) matrices are pulled towards those of
    a frozen Gram teacher (an earlier checkpoint). Off while weight is 0."""

    weight: float = 0.0  # weight of the Gram loss after the warm-up (0: no Gram anchoring)
    start_epoch: float = 0.0  # the Gram loss is off before this epoch
    warmup_epochs: float = 0.0  # then a cosine ramp 0 -> weight over these epochs (local DINO weight: 1 -> its value)
    final_weight: float = -1.0  # < 0: constant weight after the warm-up; else cosine to this value at the end
    local_dino_weight: float = 0.5  # weight of the DINO local-crop pairs while the Gram loss is on (DINOv3: 0.5)
    teacher: str = ""  # a run directory (see teacher_step), a dinolite checkpoint or an official-layout file
    teacher_step: int = -1  # with a run directory: the checkpoint step to take (-1: its newest)
    update_every: int = 0  # refresh the Gram teacher from the EMA teacher every n steps (0: never)
    first_update: int = 0  # no refresh before this step (refreshes at multiples of update_every, as officially)
    max_updates: int = 0  # at most this many refreshes (0: no limit)
    teacher_scale: float = 2.0  # the teacher sees the same crops at this times the global size (1: the same)
    img_level: bool = True  # one Gram matrix per image (False: one over all patches of the batch)
    remove_neg: str = "none"  # "none", "both" or "teacher" (see dinolite.losses.gram_loss)


@dataclass
class TeacherConfig:
    """Distillation (DINOv3): a frozen, trained teacher (backbone + DINO and iBOT heads) gives the targets;
    the student (and any extra students, sharing each teacher pass) learn from it. Off while checkpoint is ""."""

    checkpoint: str = ""  # a dinolite run directory ("RUN@STEP" for a step), checkpoint or official-layout file
    config: str = ""  # the teacher's recipe or YAML, for a file that holds no config (an official-layout file)
    # More students: "name:key=value,key=value;name2:..." with model.* overrides, e.g. "small:embed_dim=64,depth=2"
    students: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    @property
    def total_steps(self) -> int:
        return self.train.epochs * self.train.epoch_length





# ---------------------------------------------------------------------------------------
# dict <-> dataclass, YAML, overrides


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _all_keys(cls, prefix="") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        ftype = _resolved_type(cls, f.name)
        if dataclasses.is_dataclass(ftype):
            keys += _all_keys(ftype, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def valid_keys() -> list[str]:
    """Every dotted key an override or a YAML file may set."""
    return _all_keys(Config)


def _resolved_type(cls, name):
    return typing.get_type_hints(cls)[name]


def _unknown_key_error(key: str) -> ValueError:
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown config key {key!r}.{hint} Valid keys: {', '.join(keys)}")


def _parse_value(key: str, raw, ftype):
    """Convert `raw` (a string from the command line or a YAML scalar) to `ftype`."""
    origin = typing.get_origin(ftype)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ftype) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
            return None
        ftype = args[0]
    try:
        if ftype is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(raw, str) and raw.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if ftype is int:
            if isinstance(raw, bool):
                raise ValueError
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            if isinstance(raw, str):
                value = float(raw) if any(c in raw for c in ".eE") else int(raw)
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                return int(value)
            return int(raw)
        if ftype is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if ftype is str:
            if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
                raise ValueError
            return str(raw)
    except (TypeError, ValueError):
        raise ValueError(
            f"config key {key!r} expects {ftype.__name__}, got {raw!r}"
        ) from None
    raise ValueError(f"config key {key!r} has unsupported type {ftype}")


def set_value(cfg: Config, key: str, raw) -> None:
    """Set the dotted `key` of `cfg` in place, parsing `raw` to the field's type."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise _unknown_key_error(key)
        ftype = _resolved_type(type(node), part)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(ftype):
                raise ValueError(f"config key {key!r} is a section; set one of its fields, "
                                 f"e.g. {key}.{dataclasses.fields(ftype)[0].name}=...")
            setattr(node, part, _parse_value(key, raw, ftype))
        else:
            node = getattr(node, part)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ["section.key=value", ...] to a copy of `cfg` and validate the result."""
    cfg = config_from_dict(config_to_dict(cfg))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. optim.base_lr=0.001)")
        key, raw = item.split("=", 1)
        set_value(cfg, key.strip(), raw.strip())
    validate(cfg)
    return cfg


def _flatten(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + str(k) + "."))
        else:
            out[prefix + str(k)] = v
    return out


def config_from_dict(d: dict) -> Config:
    """Build a Config from a nested dict (missing keys keep their defaults)."""
    if not isinstance(d, dict):
        raise ValueError(f"a config must be a mapping of sections, got {type(d).__name__}")
    cfg = Config()
    flat = _flatten(d)
    if flat.get("loss.gram_weight", 0.0) == 0.0:
        flat.pop("loss.gram_weight", None)  # retired (always 0): runs saved before gram.* existed still load
    for key, value in flat.items():
        set_value(cfg, key, value)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def load_config(path: str) -> Config:
    """A YAML config file; the `dist:` section of a scale/ run's config.yaml is ignored (single process)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path} is not valid YAML{where} ({getattr(e, 'problem', None) or e}); fix it "
                         "(--print-config shows the expected layout)") from None
    if isinstance(data, dict):
        data.pop("dist", None)  # a scale/ run's config.yaml: how it was sharded, not what it computes
    try:
        return config_from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def config_diff(a: Config, b: Config) -> dict:
    """{dotted key: (value in a, value in b)} for every key where the two configs differ."""
    fa, fb = _flatten(config_to_dict(a)), _flatten(config_to_dict(b))
    return {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k]}


def parse_size_pairs(text: str) -> list[tuple[int, int, float]]:
    """crops.size_pairs "512:112:0.5,768:224:0.5" -> [(512, 112, 0.5), (768, 224, 0.5)] (probabilities
    normalised to sum 1). A malformed entry is a ValueError naming it."""
    pairs = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        try:
            g, l, p = item.split(":")
            pairs.append((int(g), int(l), float(p)))
        except ValueError:
            raise ValueError(f"config key 'crops.size_pairs': {item!r} is not GLOBAL:LOCAL:PROBABILITY "
                             "(e.g. crops.size_pairs=32:16:0.5,48:24:0.5)") from None
    total = sum(p for _, _, p in pairs)
    if pairs and (min(p for _, _, p in pairs) < 0 or total <= 0):
        raise ValueError("config key 'crops.size_pairs': probabilities must be >= 0 with a positive sum")
    return [(g, l, p / total) for g, l, p in pairs]


def parse_students(text: str) -> list[tuple[str, list[str]]]:
    """teacher.students "small:embed_dim=64,depth=2;tiny:embed_dim=32" -> [("small", ["model.embed_dim=64",
    "model.depth=2"]), ("tiny", ["model.embed_dim=32"])]: the model overrides of each extra student."""
    students = []
    for item in filter(None, (p.strip() for p in text.split(";"))):
        name, _, overrides = item.partition(":")
        name = name.strip()
        if not name.isidentifier() or name == "student":
            raise ValueError(f"config key 'teacher.students': {item!r} needs a name (letters, digits, _; not "
                             "'student', the main student) before ':', e.g. small:embed_dim=64,depth=2")
        students.append((name, [f"model.{o.strip()}" for o in overrides.split(",") if o.strip()]))
    names = [n for n, _ in students]
    if len(set(names)) != len(names):
        raise ValueError(f"config key 'teacher.students': student names repeat ({', '.join(names)})")
    return students


def validate(cfg: Config) -> None:
    """Reject values that would silently train something wrong."""
    def check(ok, key, msg):
        if not ok:
            raise ValueError(f"config key {key!r}: {msg}")

    m, c, lo, t, o = cfg.model, cfg.crops, cfg.loss, cfg.train, cfg.optim
    check(m.embed_dim % m.num_heads == 0, "model.num_heads",
          f"embed_dim {m.embed_dim} is not divisible by num_heads {m.num_heads}")
    check(m.ffn in ("mlp", "swiglu", "swiglu64"), "model.ffn", f"must be 'mlp', 'swiglu' or 'swiglu64', got {m.ffn!r}")
    check(m.pos_embed in ("learned", "rope"), "model.pos_embed",
          f"must be 'learned' or 'rope', got {m.pos_embed!r}")
    check(0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")
    check(m.drop_path_mode in ("subset", "mask"), "model.drop_path_mode",
          f"must be 'subset' or 'mask', got {m.drop_path_mode!r}")
    check(m.norm_eps >= 0.0, "model.norm_eps", "must be >= 0 (0: 1e-5 for rope models, 1e-6 otherwise)")
    check(min(m.rope_shift_coords, m.rope_jitter_coords, m.rope_rescale_coords) >= 0.0, "model.rope_rescale_coords",
          "RoPE augmentations must be >= 0 (0: off)")
    check(m.pos_embed == "rope" or not (m.rope_shift_coords or m.rope_jitter_coords or m.rope_rescale_coords),
          "model.pos_embed", "RoPE coordinate augmentations need model.pos_embed=rope")
    check(c.mask_ratio_mode in ("uniform", "upper"), "crops.mask_ratio_mode",
          f"must be 'uniform' (DINOv2) or 'upper' (DINOv3), got {c.mask_ratio_mode!r}")
    check(0.0 <= c.flip_probability <= 1.0, "crops.flip_probability", "must be in [0, 1]")
    for key, size in (("crops.global_size", c.global_size), ("crops.local_size", c.local_size)):
        check(size % m.patch_size == 0, key,
              f"{size} is not a multiple of model.patch_size={m.patch_size}; use e.g. "
              f"{max(1, round(size / m.patch_size)) * m.patch_size}")
    check(c.n_local >= 0, "crops.n_local", "must be >= 0")
    check(0.0 < c.blur_sigma_min <= c.blur_sigma_max, "crops.blur_sigma_max",
          f"need 0 < blur_sigma_min <= blur_sigma_max, got {c.blur_sigma_min} and {c.blur_sigma_max}")
    check(0.0 <= c.mask_probability <= 1.0, "crops.mask_probability", "must be in [0, 1]")
    check(0.0 <= c.mask_ratio_min <= c.mask_ratio_max <= 1.0, "crops.mask_ratio_max",
          "need 0 <= mask_ratio_min <= mask_ratio_max <= 1")
    check(lo.centering in ("sinkhorn_knopp", "softmax_center"), "loss.centering",
          f"must be 'sinkhorn_knopp' or 'softmax_center', got {lo.centering!r}")
    g = cfg.gram
    check(g.weight >= 0.0, "gram.weight", "must be >= 0 (0: no Gram anchoring)")
    check(g.start_epoch >= 0.0 and g.warmup_epochs >= 0.0, "gram.warmup_epochs",
          "gram.start_epoch and gram.warmup_epochs must be >= 0")
    check(g.local_dino_weight >= 0.0, "gram.local_dino_weight", "must be >= 0")
    check(g.update_every >= 0 and g.first_update >= 0 and g.max_updates >= 0, "gram.update_every",
          "gram.update_every, gram.first_update and gram.max_updates must be >= 0")
    check(g.teacher_step >= -1, "gram.teacher_step", "must be a checkpoint step, or -1 for the newest")
    check(g.remove_neg in ("none", "both", "teacher"), "gram.remove_neg",
          f"must be 'none', 'both' or 'teacher', got {g.remove_neg!r}")
    pairs = parse_size_pairs(c.size_pairs)
    for global_size, local_size, _ in pairs:
        check(global_size % m.patch_size == 0 and local_size % m.patch_size == 0, "crops.size_pairs",
              f"{global_size}:{local_size} are not both multiples of model.patch_size={m.patch_size}")
    for global_size in {c.global_size} | {gs for gs, _, _ in pairs}:
        gram_size = g.teacher_scale * global_size
        check(g.teacher_scale >= 1.0 and gram_size == int(gram_size) and int(gram_size) % m.patch_size == 0,
              "gram.teacher_scale", f"must be >= 1 and give a Gram crop size (teacher_scale x global size "
              f"{global_size} = {gram_size:g}) that is a multiple of model.patch_size={m.patch_size}")
    for name, overrides in parse_students(cfg.teacher.students):
        bad = [o for o in overrides if o.split("=")[0] not in _all_keys(ModelConfig, "model.")]
        check(not bad, "teacher.students", f"student {name!r}: {', '.join(bad)} is not a model key")
        check(not any(o.startswith("model.patch_size=") for o in overrides), "teacher.students",
              f"student {name!r}: every student uses the teacher's patch size (model.patch_size)")
    check(not cfg.teacher.students or cfg.teacher.checkpoint, "teacher.students",
          "extra students need a teacher to distil from: set teacher.checkpoint")
    # DINOv3's distillation config has gram.use_loss: false, and dinolite.train.distill has no Gram term: refuse
    # rather than train without the loss asked for.
    check(not (cfg.teacher.checkpoint and g.weight > 0), "gram.weight",
          "distillation (teacher.checkpoint) has no Gram term, as officially: set gram.weight=0, or run the Gram "
          "and high-resolution stages on the teacher's own self-supervised run")
    check(t.precision in ("auto", "bf16", "fp32"), "train.precision",
          f"must be 'auto', 'bf16' or 'fp32', got {t.precision!r}")
    check(t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), "train.device",
          f"must be 'auto', 'cpu' or 'cuda[:i]', got {t.device!r}")
    check(t.batch_size >= 2, "train.batch_size", "must be >= 2 (KoLeo needs a neighbour)")
    check(t.epochs >= 1, "train.epochs", "must be >= 1")
    check(t.epoch_length >= 0, "train.epoch_length", "must be >= 0 (0: len(dataset) // batch)")
    check(t.num_workers >= 0, "train.num_workers", "must be >= 0 (0: load data in the training process)")
    check(t.threads >= 0, "train.threads", "must be >= 0 (0: auto, the cores left by the data workers)")
    check(t.keep_last >= 1, "train.keep_last", "must be >= 1")
    check(t.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    check(t.log_every >= 1, "train.log_every", "must be >= 1")
    check(t.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1")
    check(0.0 <= t.max_bad_images_fraction < 1.0, "train.max_bad_images_fraction", "must be in [0, 1)")
    check(t.minutes >= 0, "train.minutes", "must be >= 0 (0: no wall-clock budget, train.epochs x epoch_length steps)")
    check(0.0 < o.layerwise_decay <= 1.0, "optim.layerwise_decay", "must be in (0, 1]")
    check(0.0 <= o.momentum_teacher <= 1.0, "optim.momentum_teacher", "must be in [0, 1]")
    check(o.base_lr > 0, "optim.base_lr", "must be > 0")
    check(o.scaling_rule in ("sqrt_1024", "sqrt_1024_x4", "linear_256", "none"), "optim.scaling_rule",
          f"must be 'sqrt_1024' (DINOv2), 'sqrt_1024_x4' (DINOv3), 'linear_256' or 'none', got {o.scaling_rule!r}")
    check(o.lr_schedule in ("cosine", "constant", "cosine_rise"), "optim.lr_schedule",
          f"must be 'cosine', 'constant' or 'cosine_rise', got {o.lr_schedule!r}")
