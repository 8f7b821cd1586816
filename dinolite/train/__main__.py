"""Command line: python -m dinolite.train --config NAME|FILE --data SPEC --output-dir DIR [key=value ...]

Examples:
    python -m dinolite.train --config tiny-cpu --data builtin --output-dir runs/tiny
    python -m dinolite.train --config vits16-imagenette-1gpu --data imagenette:~/data \
        --output-dir runs/vits16 train.batch_size=128 optim.base_lr=0.002
Re-running with the same --output-dir resumes from its latest checkpoint.

Continue a finished run with Gram anchoring (DINOv3's refinement stage), anchored to its step-100 teacher:
    python -m dinolite.train --config dinov3-tiny-cpu-gram --data textures --output-dir runs/tiny-gram \
        --continue-from runs/tiny gram.teacher=runs/tiny gram.teacher_step=100
Distil a trained teacher (with its heads) into a student and a smaller second student (chapter 10):
    python -m dinolite.train --config tiny-cpu-distill --data textures:n=10000,size=32 --output-dir runs/distill \
        teacher.checkpoint=book/weights/textures_p8_teacher.pth teacher.students="small:embed_dim=32,num_heads=1"
A config, data or output-directory problem prints one line `error: ...` and exits with code 2; a fault during the
run (a full disk, a loss that stays non-finite, too many images gone bad) one line `error: ...` and code 1; SIGTERM
(e.g. SLURM before a time limit) finishes the step, writes a checkpoint, says so and exits with code 143.
"""
import argparse
import os
import sys

from dinolite.data import DATA_SPEC_FORMS, DataError
from dinolite.train.config import apply_overrides, valid_keys
from dinolite.train.recipes import RECIPES, get_config


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun / SLURM launchers set it (1 when absent or not a number)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def torchrun_error() -> str:
    return (f"dinolite.train runs in one process, but WORLD_SIZE={os.environ.get('WORLD_SIZE')} (torchrun?): each "
            "process would train its own copy into the same directory. For several processes or GPUs use "
            "`torchrun --nproc_per_node N scale/train.py --config ... --data ... --output-dir ...` "
            "(the same configs and keys); for one process run without torchrun")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dinolite.train",
        description="Train DINOv2 (DINO + iBOT + KoLeo) with an EMA teacher.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="data specs:\n  " + "\n  ".join(DATA_SPEC_FORMS)
        + "\n\noverride keys (key=value):\n  " + " ".join(valid_keys()),
    )
    parser.add_argument("--config", required=True, help=f"a recipe ({', '.join(RECIPES)}) or a YAML file")
    parser.add_argument("--data", help="dataset spec, e.g. builtin, builtin:n=2000,size=64, imagenette:ROOT "
                        "(required unless --print-config)")
    parser.add_argument("--output-dir", help="checkpoints, logs, config.yaml, exported teacher; resumed if it exists "
                        "(required unless --print-config)")
    parser.add_argument("--continue-from", metavar="RUN[@STEP]",
                        help="start a new run from another run's checkpoint (its newest, or STEP): weights, "
                             "optimiser and step count, with this config (e.g. a Gram-anchoring stage)")
    parser.add_argument("--init-from", metavar="RUN[@STEP]",
                        help="start at step 0 from another run's teacher weights only (fresh optimiser), e.g. the "
                             "DINOv3 high-resolution stage")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.base_lr=0.001 model.depth=6")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.print_config and not (args.data and args.output_dir):
        parser.error("--data and --output-dir are required to train (only --config for --print-config)")
    if world_size_from_env() > 1:
        print(f"error: {torchrun_error()}", file=sys.stderr)
        return 2
    try:
        cfg = apply_overrides(get_config(args.config), args.overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from dinolite.train.config import config_to_dict
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    from dinolite.checkpoint import CheckpointError, DiskFullError
    from dinolite.data import BadImagesError
    from dinolite.train.budget import BudgetError
    from dinolite.train.loop import train
    from dinolite.train.faults import NonFiniteLossError, PREEMPTED_EXIT_CODE, one_line
    from dinolite.train.run import OutputDirError, UnusableGPUError

    try:
        arch = train(cfg, args.data, output_dir=args.output_dir, continue_from=args.continue_from,
                     init_from=args.init_from)
    except (NonFiniteLossError, DiskFullError, BadImagesError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except (DataError, OutputDirError, CheckpointError, UnusableGPUError, BudgetError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    if arch.stopped_by:
        print(arch.stopped_by, file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    last = next((r for r in reversed(arch.history) if "knn_top1" in r), None)
    summary = f"done: {arch.completed_steps}/{arch.total_steps} steps, outputs in {args.output_dir}"
    if last:
        who = "student (EMA)" if cfg.teacher.checkpoint else "teacher"
        summary += f", {who} kNN top-1 {last['knn_top1']:.1f}%"
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
