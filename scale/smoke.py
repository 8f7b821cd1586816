"""A short timed run of scale/train.py's sharded step: images/s, peak memory (vs the memory planner) and TFLOP/s.

    python -m scale.smoke --config vitg14-lvd142m --batch-per-gpu 16 --steps 20 --plan plan.json   # on a GPU
    python -m scale.smoke --tiny                                                                     # CPU check

scale/smoke_gpu.sh runs the first (ViT-g/14, FSDP2 on one device, bf16, activation checkpointing). One real
multi-crop batch is built once and reused, so the numbers are the model's, not the data loader's. FLOPs are
counted by torch's FlopCounterMode over one step (matmuls and attention, forward, backward and the recomputation
of activation checkpointing); the timed steps come after a few warm-up steps.
"""
import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scale.smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vitg14-lvd142m")
    parser.add_argument("--batch-per-gpu", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--plan", default=None, help="JSON of python -m scale.plan ... --json, to compare memory")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU in fp32 (checks this script)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from torch.utils.flop_counter import FlopCounterMode

    from dinolite.data import build_dataset
    from dinolite.train.data import StepBatches, move_batch
    from dinolite.train.run import make_autocast
    from dinolite.train.optim import build_optimizer, schedule_values
    from scale.config import load_scale_config
    from scale.parallelize import build_sharded_arch, init_distributed
    from scale.train import train_step

    overrides = [f"train.batch_size={args.batch_per_gpu}", "dist.activation_checkpointing=full", *args.overrides]
    if args.tiny:
        args.config = "tiny-cpu"
        overrides = ["model.depth=2", "train.batch_size=4", "train.device=cpu", "dist.param_dtype=fp32",
                     "train.precision=fp32", *args.overrides]
    cfg, dcfg = load_scale_config(args.config, overrides)
    device = init_distributed(cfg.train.device)
    world, is_main = dist.get_world_size(), dist.get_rank() == 0
    size = cfg.crops.global_size
    dataset = build_dataset(f"textures:n={max(64, 2 * cfg.train.batch_size * world)},size={size + size // 7}")
    total_steps = args.warmup + args.steps + 1
    batch = move_batch(StepBatches(dataset, cfg, total_steps, 0, dist.get_rank(), world)[0], device)

    tic = time.perf_counter()
    arch = build_sharded_arch(cfg, dcfg, device)
    optimizer = build_optimizer(arch.student, cfg)
    build_s = time.perf_counter() - tic
    autocast = make_autocast(device, cfg.train.precision)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    global_batch = cfg.train.batch_size * world

    def step(i):
        values = schedule_values(cfg, i, total_steps, cfg.train.epoch_length, global_batch)
        return train_step(arch, optimizer, batch, i, values, cfg.train.seed, cfg.optim.clip_grad, autocast)

    with FlopCounterMode(display=False) as counter:
        record = step(0)
    flops_per_step = counter.get_total_flops() * world  # counted on this rank's batch; every rank does the same
    for i in range(1, args.warmup + 1):
        step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    tic = time.perf_counter()
    for i in range(args.warmup + 1, args.warmup + 1 + args.steps):
        record = step(i)
    sync()
    seconds = (time.perf_counter() - tic) / args.steps

    result = {"config": args.config, "processes": world, "device": str(device), "batch_per_gpu": cfg.train.batch_size,
              "build_s": round(build_s, 1), "step_s": seconds, "images_per_s": global_batch / seconds,
              "tflops_per_s": flops_per_step / seconds / 1e12 / world, "loss": record["loss"]}
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    if args.plan:
        with open(args.plan) as f:
            plan = json.load(f)
        result["planner_total_bytes"] = plan["total_bytes"]
        if "peak_memory_bytes" in result:
            result["peak_vs_planner"] = result["peak_memory_bytes"] / plan["total_bytes"]
    if is_main:
        print(f"{args.config}: {world} process(es) on {device}, batch {cfg.train.batch_size} per GPU, "
              f"{result['images_per_s']:.1f} images/s, {result['step_s']:.3f} s/step, "
              f"{result['tflops_per_s']:.2f} TFLOP/s per device (FlopCounterMode), loss {record['loss']:.3f}")
        if "peak_memory_bytes" in result:
            line = f"peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB"
            if "peak_vs_planner" in result:
                line += (f" vs planner total {result['planner_total_bytes'] / 2**30:.2f} GiB "
                         f"(ratio {result['peak_vs_planner']:.2f})")
            print(line)
        print(json.dumps(result))
    dist.destroy_process_group()
    return 0 if torch.isfinite(torch.tensor(record["loss"])) else 1


if __name__ == "__main__":
    sys.exit(main())
