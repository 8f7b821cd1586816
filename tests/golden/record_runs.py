"""Record a few steps of each training loop: per-step losses and a checksum of the final teacher weights.

    PYTHONPATH=. python tests/golden/record_runs.py            # prints the JSON entry of this machine
    PYTHONPATH=. python tests/golden/record_runs.py --write    # adds/replaces it in tests/data/golden_runs.json

Runs, on tiny built-in data, through the public entry points (so the whole run skeleton is exercised:
output directory, checkpoints, resume, logging, the step):
  dinov2:  dinolite.train.train, 4 steps, stopped at 2 and resumed (checkpoint, resume path)
  gram:    a DINOv3 Gram-anchoring stage continuing from that run (gram.teacher = its step-2 checkpoint)
  distill: distillation of a fresh tiny teacher into two students, 3 steps
  scale:   scale/train.py's train() in 2 gloo processes, 3 steps
An entry is keyed by what decides the float results bit for bit: torch version, ATen CPU capability, threads.
tests/test_golden_runs.py re-runs this and compares.
"""
import hashlib
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GOLDEN_PATH = os.path.join(ROOT, "tests", "data", "golden_runs.json")
TERMS = ("loss", "dino", "ibot", "koleo", "gram", "grad_norm", "backbone_grad_norm", "dino_head_grad_norm",
         "ibot_head_grad_norm")
MICRO = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.drop_path_rate=0.1",
         "head.dino_out_dim=64", "head.ibot_out_dim=64", "head.hidden_dim=64", "head.bottleneck_dim=32",
         "crops.n_local=2", "train.batch_size=8", "train.epochs=1", "train.epoch_length=4", "train.knn_every=0",
         "train.monitor_every=0", "train.log_every=1", "train.progress=false", "train.checkpoint_every=2",
         "train.keep_last=2", "optim.warmup_epochs=0.5", "train.num_workers=0", "train.threads=0"]
DATA = "builtin:n=32,size=32"


def environment() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def checksum(state: dict) -> dict:
    """sha256 of the weights' bytes (in key order) and their float64 sum of |w| (a tolerant check)."""
    digest, total = hashlib.sha256(), 0.0
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.view(torch.int16).numpy().tobytes())
        if tensor.is_floating_point():
            total += tensor.double().abs().sum().item()
    return {"sha256": digest.hexdigest(), "abs_sum": total}


def _losses(history) -> list[dict]:
    return [{k: r[k] for k in ("step", *TERMS) if k in r} for r in history if "loss" in r]


def record_dinov2(tmp: str) -> dict:
    from dinolite.train import apply_overrides, get_config, train

    cfg = apply_overrides(get_config("tiny-cpu"), MICRO)
    out = os.path.join(tmp, "dinov2")
    first = train(cfg, DATA, output_dir=out, stop_at_step=2, knn_data=None)
    resumed = train(cfg, DATA, output_dir=out, knn_data=None)
    gram_cfg = apply_overrides(get_config("tiny-cpu"), MICRO + [
        "train.epochs=2", "gram.weight=1.0", f"gram.teacher={out}", "gram.teacher_step=2", "gram.start_epoch=0", "gram.warmup_epochs=0",
        "gram.teacher_scale=1", "gram.update_every=0"])
    gram = train(gram_cfg, DATA, output_dir=os.path.join(tmp, "gram"), knn_data=None, continue_from=out)
    return {"dinov2": {"losses": _losses(first.history) + _losses(resumed.history),
                       "teacher": checksum(resumed.teacher.state_dict())},
            "gram": {"losses": _losses(gram.history), "teacher": checksum(gram.teacher.state_dict())}}


def record_distill(tmp: str) -> dict:
    from dinolite.train import DINOv2MetaArch, apply_overrides, config_to_dict, get_config, train

    teacher_cfg = apply_overrides(get_config("dinov3-tiny-cpu"), [
        "model.patch_size=8", "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.img_size=32"])
    torch.manual_seed(1)
    teacher = DINOv2MetaArch(teacher_cfg)
    path = os.path.join(tmp, "teacher.pth")
    torch.save({"config": config_to_dict(teacher_cfg), "teacher": teacher.teacher.state_dict(), "step": 0}, path)
    cfg = apply_overrides(get_config("tiny-cpu-distill"), [
        "model.patch_size=8", "model.embed_dim=32", "model.depth=1", "model.num_heads=1", "train.batch_size=8",
        "train.epochs=1", "train.epoch_length=3", "train.num_workers=0", "train.progress=false", "train.log_every=1",
        "train.knn_every=0", "train.threads=0", f"teacher.checkpoint={path}",
        "teacher.students=small:embed_dim=16,num_heads=1"])
    arch = train(cfg, DATA, output_dir=os.path.join(tmp, "distill"), knn_data=None)
    losses = [{k: v for k, v in r.items() if k == "step" or k.split("/")[0] in TERMS} for r in arch.history]
    return {"distill": {"losses": losses,
                        "teacher": {name: checksum(ema.state_dict()) for name, ema in arch.emas.items()}}}


def _scale_rank(rank, world, output_dir):
    from scale import train as scale_train
    from scale.checkpoint import full_state_dict
    from scale.config import load_scale_config

    torch.set_num_threads(1)
    cfg, dcfg = load_scale_config("tiny-cpu", [
        "model.depth=2", "model.embed_dim=48", "model.num_heads=3", "head.dino_out_dim=64", "head.ibot_out_dim=64",
        "head.hidden_dim=64", "head.bottleneck_dim=32", "train.epochs=1", "train.epoch_length=3",
        "optim.warmup_epochs=0.34", "train.num_workers=0", "train.log_every=1", "train.progress=false",
        "train.batch_size=4", "dist.param_dtype=fp32", "dist.koleo_group_size=0"])
    arch = scale_train.train(cfg, dcfg, "textures:n=64,size=32", output_dir, log=lambda *a: None)
    teacher = full_state_dict(arch.teacher)
    return {"losses": _losses(arch.history), "teacher": checksum(teacher) if rank == 0 else None}


def record_scale(tmp: str) -> dict:
    from tests.distributed_utils import run_distributed

    results = run_distributed(_scale_rank, world_size=2, args=(os.path.join(tmp, "scale"),))
    return {"scale": results[0]}


def record_all() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        runs.update(record_dinov2(tmp))
        runs.update(record_distill(tmp))
        runs.update(record_scale(tmp))
    return {**environment(), "runs": runs}


def load_golden() -> list[dict]:
    if not os.path.exists(GOLDEN_PATH):
        return []
    with open(GOLDEN_PATH) as f:
        return json.load(f)["entries"]


def main() -> None:
    entry = record_all()
    if "--write" in sys.argv:
        key = ("torch", "cpu_capability", "threads")
        entries = [e for e in load_golden() if tuple(e[k] for k in key) != tuple(entry[k] for k in key)] + [entry]
        with open(GOLDEN_PATH, "w") as f:
            json.dump({"about": "tests/golden/record_runs.py; re-recorded for issue 22 (per-module gradient clipping, as officially)",
                       "entries": entries}, f, indent=1)
            f.write("\n")
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
