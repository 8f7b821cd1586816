"""The Gram teacher: loading (run directory + step, checkpoint, official file), refresh schedule, resizing."""
import pytest
import torch
import torch.nn.functional as F

from dinolite import hub
from dinolite.gram_teacher import GramTeacher, resize_patch_grid
from dinolite.models import vit_tiny
from dinolite.checkpoint import CheckpointError, resolve_checkpoint, save_checkpoint


def tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    return vit_tiny(**{**dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32), **kwargs})


def test_resize_patch_grid_layout_and_values():
    # Channel 0 holds the row index, channel 1 the column index of an 8 x 10 grid (row-major tokens).
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(10.0), indexing="ij")
    patches = torch.stack([rows, cols, torch.full_like(rows, 7.0)], dim=-1).reshape(1, 80, 3)
    assert torch.equal(resize_patch_grid(patches, (8, 10), (8, 10)), patches)
    small = resize_patch_grid(patches, (8, 10), (4, 5)).reshape(4, 5, 3)
    # Layout: the row channel is constant along each output row, the column channel along each column.
    assert torch.allclose(small[..., 0], small[:, :1, 0].expand(4, 5))
    assert torch.allclose(small[..., 1], small[:1, :, 1].expand(4, 5))
    # align_corners=False, factor 2: output i samples input 2i + 0.5. Bicubic reproduces a constant, and a
    # linear ramp exactly where its 4 x 4 support lies inside the grid (2.5, 4.5, 6.5 here).
    assert torch.allclose(small[..., 2], torch.full((4, 5), 7.0))
    assert torch.allclose(small[1:3, 0, 0], torch.tensor([2.5, 4.5]), atol=1e-5)
    assert torch.allclose(small[0, 1:4, 1], torch.tensor([2.5, 4.5, 6.5]), atol=1e-5)
    # No antialias (as officially): antialiasing would average more input points when shrinking.
    maps = torch.randn(1, 5, 8, 8)
    ours = resize_patch_grid(maps.flatten(2).transpose(1, 2), (8, 8), (4, 4))
    plain = F.interpolate(maps, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    smoothed = F.interpolate(maps, size=(4, 4), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(ours, plain)
    assert (ours - smoothed.flatten(2).transpose(1, 2)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="grid"):
        resize_patch_grid(patches, (5, 5), (2, 2))


def test_frozen_and_always_in_eval_mode():
    teacher = GramTeacher(tiny(drop_path_rate=0.5))
    teacher.train()
    assert not teacher.backbone.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(teacher.patch_features(x), teacher.patch_features(x))  # no drop path
    assert teacher.patch_features(x).shape == (2, 16, 32)


def test_refresh_schedule_and_exact_resume():
    source = tiny(seed=1)
    teacher = GramTeacher(tiny(), update_every=10, first_update=20, max_updates=3)
    refreshed = [step for step in range(0, 80) if teacher.maybe_refresh(step, source)]
    assert refreshed == [20, 30, 40] and int(teacher.n_updates) == 3
    assert all(torch.equal(a, b) for a, b in zip(teacher.backbone.state_dict().values(), source.state_dict().values()))
    # Resume after two refreshes: the count comes back with the state dict, so only step 40 refreshes.
    first = GramTeacher(tiny(), update_every=10, first_update=20, max_updates=3)
    [first.maybe_refresh(step, source) for step in range(35)]
    resumed = GramTeacher(tiny(), update_every=10, first_update=20, max_updates=3)
    resumed.load_state_dict(first.state_dict())
    assert [step for step in range(35, 80) if resumed.maybe_refresh(step, source)] == [40]
    # Never refreshes without a period; no limit with max_updates=0.
    assert not any(GramTeacher(tiny()).should_refresh(step) for step in range(100))
    unlimited = GramTeacher(tiny(), update_every=5)
    # never before step 0: officially the refresh follows iteration it, (it + 1) % 5 == 0 (dinov3/train/train.py:535-544)
    assert [s for s in range(20) if unlimited.maybe_refresh(s, source)] == [5, 10, 15]
    # an offset that is not a multiple: the multiples of update_every from first_update on (official), not 15, 25, 35
    offset = GramTeacher(tiny(), update_every=10, first_update=15, max_updates=3)
    assert [s for s in range(80) if offset.maybe_refresh(s, source)] == [20, 30, 40]
    with pytest.raises(ValueError, match=">= 0"):
        GramTeacher(tiny(), update_every=-1)


def test_load_from_run_directory_step_checkpoint_and_official_file(tmp_path):
    early, late = tiny(seed=2), tiny(seed=3)
    for step, net in ((5, early), (9, late)):
        state = {"step": step, "teacher": {f"backbone.{k}": v for k, v in net.state_dict().items()},
                 "student": {}, "optimizer": {}}
        save_checkpoint(state, str(tmp_path), step)
    gram = GramTeacher(tiny()).load(str(tmp_path), step=5)
    assert all(torch.equal(a, b) for a, b in zip(gram.backbone.state_dict().values(), early.state_dict().values()))
    assert resolve_checkpoint(str(tmp_path)).endswith("checkpoint_00000009.pth")  # newest by default
    with pytest.raises(FileNotFoundError, match="kept steps: 5, 9"):
        GramTeacher(tiny()).load(str(tmp_path), step=7)
    official = tmp_path / "official.pth"
    torch.save(hub.export_official(late), official)
    gram = GramTeacher(tiny()).load(str(official))
    assert all(torch.equal(a, b) for a, b in zip(gram.backbone.state_dict().values(), late.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="not found"):
        GramTeacher(tiny()).load(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="a step"):
        resolve_checkpoint(str(official), step=3)


def test_high_resolution_teacher_features_on_the_student_grid():
    teacher = GramTeacher(tiny())
    high_res = torch.randn(2, 3, 64, 64)  # 2x the student's 32 px crops: an 8 x 8 patch grid
    features = teacher.patch_features(high_res, student_grid=(4, 4))
    assert features.shape == (2, 16, 32) and features.dtype == torch.float32
    full = teacher.backbone.forward_features(high_res)["x_norm_patchtokens"]
    torch.testing.assert_close(features, resize_patch_grid(full, (8, 8), (4, 4)))


def test_a_teacher_of_another_architecture_is_a_one_line_error(tmp_path):
    from dinolite.checkpoint import CheckpointError

    torch.save(hub.export_official(tiny(depth=3)), tmp_path / "deeper.pth")
    with pytest.raises(CheckpointError, match=r"does not fit the model \(unexpected key: blocks\.2\.") as error:
        GramTeacher(tiny()).load(str(tmp_path / "deeper.pth"))
    assert "\n" not in str(error.value)
