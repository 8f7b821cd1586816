"""Distillation (DINOv3): one frozen teacher, several students sharing its forward pass.

    frozen teacher (trained backbone + its DINO and iBOT heads, eval mode, no gradients)
    global crops [2B,3,G,G] -> CLS -> DINO head -> Sinkhorn-Knopp -> P_cls [2, B, K]
                               patches at the iBOT positions -> iBOT head -> Sinkhorn-Knopp -> P_patch [M, K']
          | one teacher pass per step, shared by every student
    student_i (own optimiser, own EMA copy): global crops (NOT masked) + local crops
        DINO(CLS logits of global and local crops, P_cls) + iBOT(patch logits at the same positions, P_patch)
        + 0.1 KoLeo(student CLS of each global crop)                                  (no Gram term)

The iBOT positions are the masks of the usual collate (10-50% of the patches of about half the global
crops), but the student's input is not masked: it is scored at those positions only. Each student keeps
an EMA copy, which is what is saved, evaluated (kNN) and exported. Run it with the usual CLI:

    python -m dinolite.train --config tiny-cpu-distill --data textures:n=10000,size=32 \\
        --output-dir runs/distill teacher.checkpoint=book/weights/textures_p8_teacher.pth

Output: checkpoints of all students (exact resume), config.yaml, metrics.jsonl and, at the end,
<output-dir>/<student name>/backbone_official.pth (the EMA backbone; main student: "student").
"""
import contextlib
import os

import torch
from torch import nn

from dinolite import distributed, hub
from dinolite.centering import sinkhorn_knopp
from dinolite.checkpoint import CheckpointError, atomic_save, load_checkpoint, resolve_checkpoint, save_checkpoint
from dinolite.data import EvalTransform, SyntheticTextures, TextureMosaics
from dinolite.ema import ema_update_, make_teacher
from dinolite.eval import dense_probe, extract_features, knn_accuracy, knn_classify, linear_probe
from dinolite.losses import DINOLoss, IBOTPatchLoss, koleo_loss
from dinolite.train.config import Config, apply_overrides, config_from_dict, config_to_dict, parse_students
from dinolite.train.data import StepBatches, derive_seed, move_batch, seed_step
from dinolite.train.meta_arch import build_student
from dinolite.train.optim import (StepValues, apply_schedule_, build_optimizer, clip_grad_norm_per_module_,
                                  schedule_values, student_modules, total_grad_norm)
from dinolite.train.recipes import get_config
from dinolite.train.faults import NonFiniteSteps, Preemption, checkpoint_bytes, finite, warn_low_disk
from dinolite.train.run import (
    Cadence,
    MetricsLog,
    RunDir,
    Steps,
    Throughput,
    make_autocast,
    make_loader,
    resolve_device,
    run_length,
    save_config_to,
    training_data,
)


def student_configs(cfg: Config) -> dict[str, Config]:
    """{"student": cfg, name: cfg with that student's model overrides, ...} in the order of teacher.students."""
    out = {"student": cfg}
    for name, overrides in parse_students(cfg.teacher.students):
        out[name] = apply_overrides(cfg, overrides)
    return out


class FrozenTeacher(nn.Module):
    """A trained backbone with its DINO and iBOT heads, never updated: eval mode, no gradients."""

    def __init__(self, modules: nn.ModuleDict, cfg: Config):
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = modules.backbone, modules.dino_head, modules.ibot_head
        self.cfg = cfg
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def targets(self, batch: dict, teacher_temp: float, autocast=contextlib.nullcontext) -> dict:
        """Sinkhorn-Knopp-centred targets (fp32): dino [2, B, K] for the global crops' CLS, ibot [M, K'] at
        batch["mask_indices"] (positions in the flattened [2B * N] patch grid)."""
        global_crops, positions = batch["global_crops"], batch["mask_indices"]
        with autocast():
            out = self.backbone.forward_features(global_crops)
            cls_logits = self.dino_head(out["x_norm_clstoken"])
            patch_logits = self.ibot_head(out["x_norm_patchtokens"].flatten(0, 1)[positions])
        dino = sinkhorn_knopp(cls_logits.float(), teacher_temp)  # both global crops centred together
        ibot = sinkhorn_knopp(patch_logits.float(), teacher_temp)  # every rank joins SK's collectives, even with 0 rows
        return dict(dino=dino.view(2, global_crops.shape[0] // 2, -1), ibot=ibot)


def load_frozen_teacher(cfg: Config, device="cpu") -> FrozenTeacher:
    """The frozen teacher of cfg.teacher: a dinolite run directory ("RUN" or "RUN@STEP": its EMA teacher), a
    dinolite checkpoint file, or a file {"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}} whose backbone
    keys may be in the official layout (then teacher.config names its architecture). Loaded strictly."""
    path = resolve_checkpoint(cfg.teacher.checkpoint)
    state = load_checkpoint(path)
    if "config" in state:
        teacher_cfg = config_from_dict(state["config"])
    elif cfg.teacher.config:
        teacher_cfg = get_config(cfg.teacher.config)
    else:
        raise CheckpointError(f"{path} holds no config: set teacher.config=<the teacher's recipe or YAML file>")
    weights = state.get("teacher", state.get("model", state))
    modules = build_student(teacher_cfg)
    try:
        hub.load_official(modules.backbone, weights)
        heads = {k: v for k, v in weights.items() if k.startswith(("dino_head.", "ibot_head."))}
        if teacher_cfg.head.share_heads:  # a saved shared head appears under both names; either is enough
            heads.update({"ibot_head." + k[len("dino_head."):]: v for k, v in heads.items() if k.startswith("dino_head.")})
        missing = [k for k in modules.state_dict() if k.startswith(("dino_head.", "ibot_head.")) and k not in heads]
        if missing:
            raise ValueError(f"no {missing[0].split('.')[0]} weights (distillation needs the teacher's DINO and iBOT "
                             "heads; released DINOv3 backbones carry none)")
        nn.ModuleDict({"dino_head": modules.dino_head, "ibot_head": modules.ibot_head}).load_state_dict(heads)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"teacher {path} does not fit its config: {str(e).strip().splitlines()[0]}") from None
    return FrozenTeacher(modules, teacher_cfg).to(device)


def check_student_fits(teacher_cfg: Config, student_cfg: Config, name: str = "student") -> None:
    """One-line CheckpointError (a ValueError) when the student's heads or patch size cannot be scored against the
    teacher's."""
    checks = (("model.patch_size", teacher_cfg.model.patch_size, student_cfg.model.patch_size, "patch size"),
              ("head.dino_out_dim", teacher_cfg.head.dino_out_dim, student_cfg.head.dino_out_dim,
               "DINO head prototype count"),
              ("head.ibot_out_dim", teacher_cfg.head.ibot_out_dim, student_cfg.head.ibot_out_dim,
               "iBOT head prototype count"))
    for key, theirs, ours, what in checks:
        if theirs != ours:
            raise CheckpointError(f"the teacher's {what} is {theirs} but {name}'s is {ours}: set {key}={theirs} "
                             "(a student is scored against the teacher's prototypes, patch by patch)")


class DistillArch(nn.Module):
    """The frozen teacher, the students (ModuleDict name -> backbone/dino_head/ibot_head) and their EMA copies.

    `arch.students["student"]` is the main student (cfg.model); `arch.emas[name]` is what gets exported.
    A passed-in `teacher` is moved to `device` (in place, as nn.Module.to does): the batches go there.
    """

    def __init__(self, cfg: Config, device="cpu", teacher: FrozenTeacher | None = None):
        super().__init__()
        self.cfg = cfg
        self.teacher = (teacher if teacher is not None else load_frozen_teacher(cfg, device)).to(device)
        self.student_cfgs = student_configs(cfg)
        self.students, self.emas = nn.ModuleDict(), nn.ModuleDict()
        for i, (name, student_cfg) in enumerate(self.student_cfgs.items()):
            check_student_fits(self.teacher.cfg, student_cfg, name)
            torch.manual_seed(derive_seed(cfg.train.seed, i))
            self.students[name] = build_student(student_cfg).to(device)
            self.emas[name] = make_teacher(self.students[name])
        self.dino_loss = DINOLoss(cfg.loss.student_temp)
        self.ibot_loss = IBOTPatchLoss(cfg.loss.student_temp)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        self.emas.eval()
        return self

    def student_losses(self, student: nn.ModuleDict, batch: dict, targets: dict, autocast,
                       local_dino_weight: float = 1.0) -> dict:
        """DINO (global + local CLS), iBOT (patches at the target positions, input unmasked), KoLeo (global CLS)."""
        w = self.cfg.loss
        global_crops, local_crops, positions = batch["global_crops"], batch["local_crops"], batch["mask_indices"]
        n_images = global_crops.shape[0]
        B = n_images // 2
        crops = [global_crops] if local_crops is None else [global_crops, local_crops]
        with autocast():
            outs = student.backbone.forward_features_list(crops, [None] * len(crops))
            global_cls = outs[0]["x_norm_clstoken"]  # [2B, D]
            cls_all = torch.cat([o["x_norm_clstoken"] for o in outs])
            cls_logits = student.dino_head(cls_all).float()
            patch_logits = student.ibot_head(outs[0]["x_norm_patchtokens"].flatten(0, 1)[positions]).float()
        K = cls_logits.shape[-1]
        n_local = len(cls_all) // B - 2
        student_local = cls_logits[n_images:].view(n_local, B, K) if n_local else None
        dino = self.dino_loss(cls_logits[:n_images].view(2, B, K), student_local, targets["dino"],
                              local_weight=local_dino_weight)
        ibot = (self.ibot_loss(patch_logits, targets["ibot"], batch["masks_weight"], n_images) if len(positions)
                else patch_logits.sum() * 0.0)
        koleo = sum(koleo_loss(crop_cls) for crop_cls in global_cls.float().chunk(2))
        loss = w.dino_weight * dino + w.ibot_weight * ibot + w.koleo_weight * koleo
        return dict(loss=loss, dino=dino.detach(), ibot=ibot.detach(), koleo=koleo.detach())

    def forward_losses(self, batch: dict, teacher_temp: float, autocast=contextlib.nullcontext,
                       local_dino_weight: float = 1.0) -> dict[str, dict]:
        """{student name: its loss terms}; the teacher runs once for all of them."""
        targets = self.teacher.targets(batch, teacher_temp, autocast)
        return {name: self.student_losses(student, batch, targets, autocast, local_dino_weight)
                for name, student in self.students.items()}


def build_optimizers(arch: DistillArch) -> dict[str, torch.optim.Optimizer]:
    """One AdamW per student (its own layer-wise decay depth), so gradient clipping stays per student."""
    return {name: build_optimizer(arch.students[name], student_cfg) for name, student_cfg in arch.student_cfgs.items()}


LOGGED = ("loss", "dino", "ibot", "koleo", "grad_norm", "backbone_grad_norm", "dino_head_grad_norm",
          "ibot_head_grad_norm")


def distill_step(arch: DistillArch, optimizers: dict, batch: dict, step: int, values: StepValues, seed: int = 0,
                 clip_grad: float = 3.0, rank: int = 0, autocast=contextlib.nullcontext) -> dict[str, dict]:
    """One step for every student: one teacher pass, backward, clip (per student and module, as officially), AdamW,
    EMA update. Each student's dict gets `<module>_grad_norm` (before clipping) and their total `grad_norm`.
    A student whose loss or gradient norm is not finite is not updated (its out["finite"] is False)."""
    seed_step(seed, step, rank)
    arch.train()
    for optimizer in optimizers.values():
        apply_schedule_(optimizer, values)
        optimizer.zero_grad(set_to_none=True)
    outs = arch.forward_losses(batch, values.teacher_temp, autocast, values.local_dino_weight)
    sum(out["loss"] for out in outs.values()).backward()  # the students share no parameter
    for name, out in outs.items():
        norms = clip_grad_norm_per_module_(student_modules(arch.students[name]), clip_grad)
        out.update({f"{module}_grad_norm": norm for module, norm in norms.items()}, grad_norm=total_grad_norm(norms))
        out["finite"] = finite(out["loss"], out["grad_norm"])
        if out["finite"]:
            optimizers[name].step()
            ema_update_(arch.emas[name], arch.students[name], values.momentum)
        out["loss"] = out["loss"].detach()
    return outs


def distill_state(arch: DistillArch, optimizers: dict, step: int, cfg: Config) -> dict:
    return {"step": step, "config": config_to_dict(cfg),
            "students": {name: s.state_dict() for name, s in arch.students.items()},
            "emas": {name: e.state_dict() for name, e in arch.emas.items()},
            "optimizers": {name: o.state_dict() for name, o in optimizers.items()}}


def train_distill(cfg: Config, data, output_dir=None, stop_at_step=None, knn_data="auto", device=None,
                  progress=None, teacher: FrozenTeacher | None = None, continue_from: str | None = None) -> DistillArch:
    """Distil cfg.teacher's teacher into the student(s); called by dinolite.train.train when teacher.checkpoint
    is set. Same arguments as train (plus an already loaded `teacher`); returns the DistillArch with
    `history`, `completed_steps`, `total_steps`. Resumes from output_dir's newest checkpoint. continue_from
    ("RUN[@STEP]" or a file of another distillation run): start the same students from its weights and EMA copies
    with fresh optimisers at step 0 of this config (e.g. a high-resolution stage with crops.size_pairs)."""
    t = cfg.train
    device = resolve_device(device or t.device)
    progress = t.progress if progress is None else progress
    if distributed.get_world_size() > 1:
        raise NotImplementedError("distillation runs in a single process here (the students share one teacher pass)")
    dataset, knn_data = training_data(data, cfg, knn_data, index_dir=output_dir)
    epoch_length, total_steps = run_length(cfg, dataset)
    arch = DistillArch(cfg, device, teacher)
    optimizers = build_optimizers(arch)

    run_dir = RunDir(output_dir)
    start_step = 0
    path = run_dir.latest_checkpoint()
    if path:
        run_dir.check_config(cfg)
        state = load_checkpoint(path, map_location=device)
        for name in arch.students:
            arch.students[name].load_state_dict(state["students"][name])
            arch.emas[name].load_state_dict(state["emas"][name])
            optimizers[name].load_state_dict(state["optimizers"][name])
        start_step = int(state["step"])
        print(f"resuming from step {start_step} (checkpoint {path})")
    if continue_from and start_step == 0:
        source = resolve_checkpoint(continue_from)
        state = load_checkpoint(source, map_location=device)
        try:
            for name in arch.students:
                arch.students[name].load_state_dict(state["students"][name])
                arch.emas[name].load_state_dict(state["emas"][name])
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"{source} does not hold student {name!r} of this config ({type(e).__name__}): "
                                  "continue a distillation run with the same students") from None
    batches = StepBatches(dataset, cfg, total_steps, start_step)
    run_dir.start(start_step, save_config_to(cfg), data=data)
    end_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
    log = MetricsLog(run_dir, t.tensorboard, t.wandb)
    stop = Preemption(device)
    cadence = Cadence(t, end_step, stop)
    nonfinite = NonFiniteSteps(t.max_nonfinite, run_dir.path)
    warn_low_disk(run_dir, sum(checkpoint_bytes(arch.students[n], arch.emas[n]) for n in arch.students), t.keep_last)
    autocast = make_autocast(device, t.precision)

    def evaluate_knn(step):
        if knn_data is not None:
            record = {f"knn_top1/{name}": knn_accuracy(ema.backbone, knn_data, k=t.knn_k)
                      for name, ema in arch.emas.items()}
            log.log({"step": step, "knn_top1": record["knn_top1/student"], **record})

    if start_step == 0 and t.knn_every and start_step < end_step:
        evaluate_knn(0)
    steps = Steps(make_loader(batches, t.num_workers, device), start_step, end_step, progress, "distilling", stop)
    throughput = Throughput(t.batch_size, start_step)
    for step, batch in steps:
        values = schedule_values(cfg, step, total_steps, epoch_length, t.batch_size)
        outs = distill_step(arch, optimizers, move_batch(batch, device), step, values, seed=t.seed,
                            clip_grad=cfg.optim.clip_grad, autocast=autocast)
        done = step + 1
        all_finite = all(out["finite"] for out in outs.values())
        if cadence.log(done) or not all_finite:
            record = {"step": done, "lr": values.lr, "momentum": values.momentum, "teacher_temp": values.teacher_temp,
                      "images_per_s": throughput(done)}
            for name, out in outs.items():
                suffix = "" if name == "student" else f"/{name}"
                record.update({f"{k}{suffix}": out[k].item() for k in LOGGED if k in out})
            log.log(record)
            steps.show(loss=record["loss"])
        worst = next((out for out in outs.values() if not out["finite"]), outs["student"])
        nonfinite.update(all_finite, done, worst["loss"].item(), worst["grad_norm"].item())
        if cadence.knn(done):
            evaluate_knn(done)
        if run_dir.path and cadence.checkpoint(done):
            save_checkpoint(distill_state(arch, optimizers, done, cfg), output_dir, done, t.keep_last)

    finished = steps.completed >= total_steps
    if finished and start_step < total_steps:
        evaluate_knn(total_steps)
    if finished and run_dir.path:
        for name, ema in arch.emas.items():
            os.makedirs(run_dir.file(name), exist_ok=True)
            atomic_save(hub.export_official(ema.backbone), os.path.join(run_dir.file(name), "backbone_official.pth"))
    log.close()
    arch.history, arch.total_steps, arch.completed_steps = log.history, total_steps, steps.completed
    arch.stopped_by = stop.message(output_dir, run_dir.latest_checkpoint()) if stop.stopped_at else None
    return arch


def texture_scores(backbone: nn.Module, image_size: int = 32, n_train: int = 1000, n_test: int = 500,
                   n_dense: tuple[int, int] = (300, 200), seed: int = 100, dense: bool = True,
                   per_query: bool = False) -> dict:
    """kNN and linear top-1 (%) on [CLS] features of SyntheticTextures, and the dense probe's mIoU (%) on
    TextureMosaics (12 classes, one label per pixel): the instruments of chapter 10 and of the reference teacher.
    Train and test images come from different generator seeds (seed, seed + 100). Deterministic. dense=False
    skips the dense probe; per_query=True adds knn_correct and linear_correct, bool [n_test]: which test images
    each probe got right (for dinolite.eval.paired_sign_test)."""
    transform = EvalTransform(None, None)
    train = extract_features(backbone, SyntheticTextures(n_train, image_size, seed=seed, transform=transform),
                             progress=False)
    test = extract_features(backbone, SyntheticTextures(n_test, image_size, seed=seed + 100, transform=transform),
                            progress=False)
    knn = knn_classify(train["cls"], train["labels"], test["cls"], test["labels"], k=20)
    linear = linear_probe(train["cls"], train["labels"], test["cls"], test["labels"], num_classes=12)
    scores = {"knn_top1": round(float(knn["top1"]), 2), "linear_top1": round(float(linear["top1"]), 2)}
    if per_query:
        with torch.no_grad():
            scores["linear_correct"] = linear["probe"](test["cls"]).argmax(-1) == test["labels"]
        scores["knn_correct"] = knn["predictions"] == test["labels"]
    if not dense:
        return scores
    dense_train, dense_test = (extract_features(backbone, TextureMosaics(n, image_size, seed=s, transform=transform),
                                                patch_tokens=True, progress=False)
                               for n, s in ((n_dense[0], seed), (n_dense[1], seed + 100)))
    probe = dense_probe(dense_train["patch"], dense_train["masks"], dense_test["patch"], dense_test["masks"], 12)
    return {**scores, "dense_miou": round(float(probe["miou"]), 2)}
