"""Write the EMA teacher's backbone of a scale/ run as one official-layout .pth (what evaluation code reads).

    python -m scale.export runs/g14                       # newest checkpoint -> runs/g14/teacher_backbone_official.pth
    python -m scale.export runs/g14 --step 250000 --out g14_250k.pth --dtype bf16

One process, no process group: DCP reads the shards of any number of processes into full tensors. The file
loads strictly with dinolite.hub.load_official into a model built from the run's config (model.*), and can
serve as a Gram teacher (gram.teacher=FILE).
"""
import argparse
import os
import sys
import warnings

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed.checkpoint as dcp

from dinolite.checkpoint import CheckpointError, CheckpointNotFoundError, atomic_save
from dinolite.hub import export_official
from dinolite.train.meta_arch import build_backbone
from scale import checkpoint as ckpt


def _official_file(backbone_state: dict, cfg, dtype=None) -> dict:
    """Full backbone state dict (our names) -> official-layout dict, through a model built from cfg (on meta)."""
    with torch.device("meta"):
        backbone = build_backbone(cfg)
    backbone.load_state_dict(backbone_state, strict=True, assign=True)
    state = export_official(backbone)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def export_teacher(arch, path: str) -> None:
    """Collective (every rank calls it): gather the sharded teacher backbone on rank 0 and save it to `path`."""
    import torch.distributed as dist

    full = ckpt.full_state_dict(arch.teacher.backbone)
    if dist.get_rank() == 0:
        atomic_save(_official_file(full, arch.cfg), path)
    dist.barrier()


def export_checkpoint(run_dir: str, step: int | None = None, out: str | None = None, dtype=None) -> str:
    """The teacher backbone of run_dir's checkpoint `step` (newest if None) -> official-layout .pth; returns its path."""
    from scale.config import load_scale_config

    found = ckpt.list_checkpoints(run_dir)
    if not found:
        raise CheckpointNotFoundError(f"{run_dir} holds no dcp_<step> checkpoint of a scale/ run")
    if step is None:
        step, path = found[-1]
    else:
        path = dict(found).get(step)
        if path is None:
            raise CheckpointNotFoundError(f"{run_dir} has no checkpoint of step {step} (kept steps: "
                                          f"{', '.join(str(s) for s, _ in found)})")
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{run_dir} has no config.yaml: export needs the run's model settings")
    cfg, _ = load_scale_config(config_path)
    with torch.device("meta"):
        backbone = build_backbone(cfg)
    state = {"teacher": {f"backbone.{k}": torch.empty_like(v, device="cpu") for k, v in backbone.state_dict().items()}}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)  # no process group: one process reads every shard
    backbone_state = {k.removeprefix("backbone."): v for k, v in state["teacher"].items()}
    out = out or os.path.join(run_dir, f"teacher_backbone_official_{step:08d}.pth")
    atomic_save(_official_file(backbone_state, cfg, dtype), out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scale.export", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="output directory of a scale/train.py run")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--out", default=None, help="file to write (default: RUN_DIR/teacher_backbone_official_<step>.pth)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the saved weights")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.run_dir, args.step, args.out,
                                 torch.bfloat16 if args.dtype == "bf16" else None)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
