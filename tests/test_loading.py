"""dinolite.loading: every --checkpoint form of dinolite-embed/-eval/-report gives the backbone it names, strictly."""
import shutil

import pytest
import torch
import yaml

from dinolite.hub import build_hub_model, export_official
from dinolite.loading import LoadError, load_backbone, read_run_config
from dinolite.checkpoint import load_checkpoint


def _teacher_backbone(checkpoint_path) -> dict:
    state = load_checkpoint(str(checkpoint_path))["teacher"]
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def _assert_same(model, expected: dict):
    ours = model.state_dict()
    assert set(ours) == set(expected)
    for k in ours:
        assert torch.equal(ours[k], expected[k]), k


def test_run_directory_and_run_at_step_give_the_ema_teacher(tiny_run):
    run, arch = tiny_run
    final = load_backbone(str(run))
    assert final.kind == "dinolite" and final.image_size == 32 and "teacher export" in final.description
    _assert_same(final.model, arch.teacher.backbone.state_dict())
    at_2 = load_backbone(f"{run}@2")
    _assert_same(at_2.model, _teacher_backbone(run / "checkpoint_00000002.pth"))
    assert not torch.equal(at_2.model.cls_token, final.model.cls_token)
    with pytest.raises(LoadError, match=r"no checkpoint of step 3 \(kept steps: 2, 4\)"):
        load_backbone(f"{run}@3")


def test_official_layout_file_takes_config_beside_it_or_from_config(tiny_run, tmp_path):
    run, arch = tiny_run
    alone = tmp_path / "alone.pth"
    shutil.copy(run / "teacher_backbone_official.pth", alone)
    with pytest.raises(LoadError, match="no config.yaml beside it: pass --config") as error:
        load_backbone(str(alone))
    assert "\n" not in str(error.value)
    (tmp_path / "tiny.yaml").write_text((run / "config.yaml").read_text())
    loaded = load_backbone(str(alone), config=str(tmp_path / "tiny.yaml"))
    _assert_same(loaded.model, arch.teacher.backbone.state_dict())
    with pytest.raises(LoadError, match="does not fit its config .*pass --config"):
        load_backbone(str(alone), config="tiny-cpu")  # width 96, not the run's 32


def test_official_hub_file_is_recognised_by_name_and_by_shapes(tmp_path):
    torch.manual_seed(1)  # at_init() seeds 0: another draw
    model = build_hub_model("dinov2_vits14_reg")
    state = export_official(model)
    for name in ("dinov2_vits14_reg4_pretrain.pth", "renamed.pth"):
        torch.save(state, tmp_path / name)
        loaded = load_backbone(str(tmp_path / name))
        assert loaded.hub_name == "dinov2_vits14_reg" and loaded.kind == "hub" and loaded.image_size == 224
        _assert_same(loaded.model, model.state_dict())
    init = loaded.at_init()
    assert init.num_register_tokens == 4 and not torch.equal(init.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    v3 = build_hub_model("dinov3_vits16")  # storage_tokens, RoPE periods, key-bias masks
    torch.save(export_official(v3), tmp_path / "v3.pth")
    loaded = load_backbone(str(tmp_path / "v3.pth"))
    assert loaded.hub_name == "dinov3_vits16"
    _assert_same(loaded.model, v3.state_dict())


def test_hub_name_reads_torch_hub_cache_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(LoadError, match=r"no weights for dinov2_vits14 at .*dinov2_vits14_pretrain\.pth; dinolite "
                                        r"never downloads: get .* from https://dl\.fbaipublicfiles\.com/dinov2/"):
        load_backbone("dinov2_vits14")
    with pytest.raises(LoadError, match="accepting Meta's DINOv3 licence"):
        load_backbone("dinov3_vits16")
    with pytest.raises(LoadError, match="not found: give a run directory"):
        load_backbone("dinov2_vits15")


def test_distillation_run_gives_each_students_ema(distill_run):
    run, arch = distill_run
    main = load_backbone(str(run))
    assert main.kind == "distillation" and "student 'student'" in main.description
    _assert_same(main.model, arch.emas["student"].backbone.state_dict())
    small = load_backbone(str(run), student="small")
    assert small.model.embed_dim == 32 and small.at_init().embed_dim == 32
    _assert_same(small.model, arch.emas["small"].backbone.state_dict())
    from_file = load_backbone(str(run / "small" / "backbone_official.pth"))  # config.yaml one folder up
    _assert_same(from_file.model, arch.emas["small"].backbone.state_dict())
    at_step = load_backbone(f"{run}@3", student="small")  # the checkpoint's EMA copy: the same weights
    _assert_same(at_step.model, arch.emas["small"].backbone.state_dict())
    with pytest.raises(LoadError, match="no student 'tiny'; its students: student, small"):
        load_backbone(f"{run}@3", student="tiny")


def test_scale_run_reads_its_exported_teacher_and_names_the_export_command(scale_run, tmp_path):
    assert "dist" in yaml.safe_load((scale_run / "config.yaml").read_text())
    cfg = read_run_config(scale_run / "config.yaml")  # the dist: section is ignored
    assert cfg.model.embed_dim == 48
    loaded = load_backbone(str(scale_run))
    assert loaded.kind == "scale" and loaded.model.embed_dim == 48
    exported = torch.load(scale_run / "teacher_backbone_official.pth", weights_only=True)
    _assert_same(loaded.model, exported)
    only_dcp = tmp_path / "g14"
    shutil.copytree(scale_run, only_dcp, ignore=shutil.ignore_patterns("teacher_backbone_official.pth"))
    with pytest.raises(LoadError, match=f"DCP checkpoints only: export its teacher first with python -m scale.export {only_dcp}"):
        load_backbone(str(only_dcp))
    from scale.export import export_checkpoint
    export_checkpoint(str(only_dcp))  # -> teacher_backbone_official_00000003.pth
    _assert_same(load_backbone(str(only_dcp)).model, exported)
    _assert_same(load_backbone(f"{only_dcp}@3").model, exported)
