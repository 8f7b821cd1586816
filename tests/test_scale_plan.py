"""scale.plan, the memory planner, against hand arithmetic, REFERENCE.md and real FSDP2 runs on CPU.

The distributed tests shard a small dinolite student and its EMA teacher with fully_shard (per block, with
scale/train.py's activation checkpointing, then the backbone root and each head) in 2 and 4 gloo processes,
run one step (forward, backward, AdamW) under PyTorch's FSDPMemTracker, and compare what each rank holds
with the plan: parameter, gradient and optimizer-state bytes exactly, activations (the tracker's Activation +
Temp at the step's peak) within 15%, for checkpointing none and full (and selective in 2 processes).
"""
import json
import math

import pytest
import torch

from dinolite.train.config import apply_overrides
from dinolite.train.recipes import get_config
from scale import plan as P
from tests.distributed_utils import run_distributed

# A small DINOv3-style student: RoPE, storage tokens, LayerScale, subset drop path, separate heads.
SMALL = ["model.embed_dim=128", "model.depth=4", "model.num_heads=4", "model.drop_path_rate=0.4",
         "model.layerscale_init=1e-5", "crops.global_size=64", "crops.local_size=32", "crops.n_local=4",
         "head.dino_out_dim=256", "head.ibot_out_dim=256", "head.hidden_dim=256", "head.bottleneck_dim=64"]
SMALL_BATCH = 8


def small_config():
    return apply_overrides(get_config("dinov3-tiny-cpu"), SMALL)


# ----------------------------------------------------------------------------- arithmetic and reference facts

def test_shard_sizes_by_hand():
    assert P.shard_numel((5, 3), 2) == 3 * 3  # chunks of ceil(5/2) = 3 rows; rank 1's 2 rows are padded to 3
    assert [P.local_numel((5, 3), 2, r) for r in range(2)] == [9, 6]
    assert P.shard_numel((1, 1, 8), 4) == 8  # a [CLS] token: every rank holds a full (padded) copy ...
    assert [P.local_numel((1, 1, 8), 4, r) for r in range(4)] == [8, 0, 0, 0]  # ... only rank 0's is real
    assert P.shard_numel((4096, 4096), 256) * 256 == 4096 * 4096


def test_parameter_counts_come_from_the_modules_and_match_reference():
    g14 = P.parameter_bytes(apply_overrides(get_config("vitg14-lvd142m"), ["model.img_size=518"]), 1)
    g14 = g14["parts"]["backbone"]["numel"]
    b7 = P.parameter_bytes(get_config("dinov3-vit7b16-pretrain"), 1)["parts"]["backbone"]["numel"]
    assert abs(g14 / 1e6 - 1136.48) < 0.01  # REFERENCE.md, with the 518-px position table
    assert abs(b7 / 1e6 - 6716) < 0.5


def test_7b_weights_grads_adamw_and_teacher_match_reference():
    """REFERENCE.md: fp32 weights + grads + AdamW ~107 GB, ~27 GB per teacher copy, ~0.6 GB a GPU on 256."""
    cfg = get_config("dinov3-vit7b16-gram")
    backbone = P.parameter_bytes(cfg, 256)["parts"]["backbone"]
    per_gpu = 2 * backbone["shard_bytes"] + backbone["optimizer_bytes"]  # weights + grads + 2 AdamW states
    assert abs(per_gpu * 256 / 1e9 - 107) < 1.0
    assert abs(backbone["shard_bytes"] * 256 / 1e9 - 27) < 0.5
    result = P.plan(cfg, 256, "h100", 16, "full", search_max_batch=False)
    before_activations = sum(result[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "teachers_bytes"))
    assert 0.55e9 < before_activations < 0.7e9  # ~0.6 GB (ours adds the DINO and iBOT heads: 0.31 B parameters)
    assert result["gram_teacher_bytes"] == backbone["shard_bytes"]  # the Gram teacher is headless


def test_checkpointing_modes_order_and_max_batch_is_the_boundary():
    cfg = get_config("dinov3-vit7b16-pretrain")
    acts = {ac: P.plan(cfg, 256, "h100", 16, ac, search_max_batch=False)["activations_bytes"] for ac in P.AC_MODES}
    assert acts["full"] < acts["selective"] < acts["none"]
    result = P.plan(cfg, 256, "a100-40gb", 16, "full")
    best = result["max_batch_per_gpu"]
    assert best > 16 and result["fits"]
    assert P.plan(cfg, 256, "a100-40gb", best, "full", search_max_batch=False)["fits"]
    assert not P.plan(cfg, 256, "a100-40gb", best + 1, "full", search_max_batch=False)["fits"]


def test_step_flops_match_six_n_t():
    """FLOPs of a step ~ 6 x parameters x tokens for the student (forward + backward; drop path runs each branch
    on int(B (1 - p)) of B sequences) + 2 x parameters x tokens for the teacher forward; attention adds ~1%."""
    cfg = get_config("dinov3-vit7b16-pretrain")
    result = P.plan(cfg, 256, "h100", 16, "none", search_max_batch=False)
    n = result["config_params"]["backbone"]
    kept = int(32 * (1 - 0.4)) / 32  # the same fraction for the 2B global and 8B local crops of 16 images
    student_tokens = (2 * 16 * (16 * 16 + 5) + 8 * 16 * (7 * 7 + 5)) * kept
    teacher_tokens = 2 * 16 * (16 * 16 + 5)
    by_hand = 6 * n * student_tokens + 2 * n * teacher_tokens
    assert abs(result["step_flops"] / by_hand - 1) < 0.05
    assert math.isclose(result["step_time_s"], result["step_flops"] / (989e12 * 0.4))


def test_cli_json_and_one_line_errors(capsys):
    # the setting of the test above (its traces are cached in this process)
    assert P.main(["--config", "dinov3-vit7b16-pretrain", "--gpus", "256", "--gpu", "a100-40gb", "--batch-per-gpu",
                   "16", "--activation-checkpointing", "full", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    keys = ("params_bytes", "grads_bytes", "optimizer_bytes", "teachers_bytes", "activations_bytes")
    assert result["total_bytes"] == sum(result[k] for k in keys) + result["working_bytes"]
    assert result["fits"] is True and result["max_batch_per_gpu"] > 16 and result["gpu_bytes"] == 40 * 2 ** 30
    assert result == P.plan(get_config("dinov3-vit7b16-pretrain"), 256, "a100-40gb", 16, "full")
    for argv, words in ((["--gpu", "a100"], "unknown GPU 'a100'"), (["--batch-per-gpu", "0"], "--batch-per-gpu"),
                        (["--batch-per-gpu", "many"], "--batch-per-gpu"), (["--activation-checkpointing", "some"],
                                                                          "--activation-checkpointing")):
        args = dict(zip(["--gpu", "--batch-per-gpu", "--activation-checkpointing"], ["h100", "16", "full"]))
        args.update(dict(zip(argv[::2], argv[1::2])))
        flat = ["--config", "dinov3-vit7b16-pretrain", "--gpus", "256"] + [x for kv in args.items() for x in kv]
        assert P.main(flat) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err


# ----------------------------------------------------------------------------- FSDP2 runs on CPU

def _route(module, method):
    """Send calls of module.<method> through module.__call__, whose hooks FSDP2 and the tracker use."""
    module.forward = getattr(module, method)
    setattr(module, method, module.__call__)


def _fsdp_step(rank, world_size, modes):
    """One training step of the small config per checkpointing mode, sharded with fully_shard; bytes held."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from dinolite.train.meta_arch import DINOv2MetaArch
    from scale.parallelize import apply_activation_checkpointing  # the trainer's, per block

    torch.set_num_threads(1)
    cfg = small_config()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    results = {}
    for mode in modes:
        torch.manual_seed(0)
        arch = DINOv2MetaArch(cfg)
        arch.pack_crops = True  # the planner plans for GPUs, where the crop sizes are packed into one pass
        for model, method in ((arch.student, "forward_features_list"), (arch.teacher, "forward_features")):
            for block in model.backbone.blocks:
                apply_activation_checkpointing(block, mode if model is arch.student else "none")
                fully_shard(block, mp_policy=mp)
            fully_shard(model.backbone, mp_policy=mp)
            _route(model.backbone, method)
            for head in {id(model.dino_head): model.dino_head, id(model.ibot_head): model.ibot_head}.values():
                fully_shard(head, mp_policy=mp)
        fully_shard(arch, mp_policy=MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False))
        _route(arch, "forward_losses")
        optimizer = torch.optim.AdamW(arch.student.parameters(), lr=1e-3)
        masks = P._batch_shapes(cfg, SMALL_BATCH)["masks"]
        mask_indices = masks.flatten().nonzero().flatten()
        c = cfg.crops
        batch = dict(global_crops=torch.randn(2 * SMALL_BATCH, 3, c.global_size, c.global_size),
                     local_crops=torch.randn(c.n_local * SMALL_BATCH, 3, c.local_size, c.local_size), masks=masks,
                     mask_indices=mask_indices,
                     masks_weight=(1 / masks.sum(-1).clamp(min=1).float())[mask_indices // masks.shape[1]])
        tracker = FSDPMemTracker(arch, optimizer)
        with tracker:
            arch.forward_losses(batch, teacher_temp=0.07)["loss"].backward()
            optimizer.step()
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
        params = list(arch.student.parameters())

        def storage_bytes(tensors):  # once per storage: FSDP2 keeps a group's gradients in one buffer
            return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values())

        results[mode] = dict(
            params=storage_bytes([p.to_local() for p in params]),
            grads=storage_bytes([p.grad.to_local() for p in params]),
            optimizer=sum(storage_bytes([optimizer.state[p][k].to_local()]) for p in params
                          for k in ("exp_avg", "exp_avg_sq")),
            activations=peak["Activation"] + peak["Temp"],
            param_dtype=str(params[0].dtype),
        )
    return results


@pytest.mark.parametrize("world_size, modes", [(2, ("none", "full", "selective")), (4, ("none", "full"))])
def test_plan_equals_what_fsdp2_holds(world_size, modes):
    cfg = small_config()
    measured = run_distributed(_fsdp_step, world_size, (modes,))
    planned_acts = {mode: P.activation_bytes(P.trace_step(cfg, SMALL_BATCH), mode) for mode in modes}
    for rank, held in enumerate(measured):
        parts = P.parameter_bytes(cfg, world_size, rank)["parts"].values()
        for mode, got in held.items():
            assert got["param_dtype"] == "torch.float32"
            assert got["params"] == sum(p["shard_bytes"] for p in parts)  # padded fp32 shards
            assert got["grads"] == sum(p["shard_bytes"] for p in parts)
            assert got["optimizer"] == sum(p["optimizer_bytes"] for p in parts)  # unpadded: rank-dependent
            error = planned_acts[mode] / got["activations"] - 1
            print(f"{world_size} processes, rank {rank}, AC {mode}: activations planned {planned_acts[mode]} B, "
                  f"measured {got['activations']} B ({error:+.1%})")
            assert abs(error) < 0.15
    # the shards really differ between ranks where rows do not divide evenly
    assert len({P.parameter_bytes(cfg, world_size, r)["parts"]["backbone"]["optimizer_bytes"]
                for r in range(world_size)}) > 1
