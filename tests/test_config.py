"""Config system: recipes, YAML round trip, dotted overrides parsed to the field type, errors naming the key."""
import pytest

from dinolite.train.config import (
    Config,
    apply_overrides,
    config_diff,
    config_to_dict,
    load_config,
    save_config,
    valid_keys,
)
from dinolite.train.recipes import RECIPES, get_config


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipes_build_and_validate(name):
    cfg = get_config(name)
    assert isinstance(cfg, Config)
    apply_overrides(cfg, [])  # validates


def test_recipe_values():
    tiny = get_config("tiny-cpu")
    assert tiny.crops.global_size % tiny.model.patch_size == 0
    # DINOv2's blur sigma (0.1-2 px at 224 px) scaled to the 32 px crops
    assert (tiny.crops.blur_sigma_min, tiny.crops.blur_sigma_max) == (round(0.1 * 32 / 224, 4), round(2 * 32 / 224, 4))
    assert (get_config("vitb14-imagenet").crops.blur_sigma_min, get_config("vitb14-imagenet").crops.blur_sigma_max) == (0.1, 2.0)
    assert tiny.train.device == "auto"
    base = get_config("vitb14-imagenet")
    # DINOv2 recipe numbers (REFERENCE.md "Training recipe").
    assert (base.model.embed_dim, base.model.depth, base.model.num_heads, base.model.patch_size) == (768, 12, 12, 14)
    assert base.optim.base_lr == 0.004 and base.optim.min_lr == 1e-6
    assert (base.optim.weight_decay, base.optim.weight_decay_end) == (0.04, 0.4)
    assert (base.optim.momentum_teacher, base.optim.final_momentum_teacher) == (0.992, 1.0)
    assert (base.loss.warmup_teacher_temp, base.loss.teacher_temp) == (0.04, 0.07)
    assert (base.loss.dino_weight, base.loss.ibot_weight, base.loss.koleo_weight) == (1.0, 1.0, 0.1)
    assert base.optim.clip_grad == 3.0 and base.optim.layerwise_decay == 0.9
    assert base.optim.patch_embed_lr_mult == 0.2 and base.train.epoch_length == 1250
    assert (base.optim.adamw_beta1, base.optim.adamw_beta2) == (0.9, 0.999)
    assert base.loss.centering == "sinkhorn_knopp" and base.gram.weight == 0.0


def test_recipes_are_fresh_objects():
    a = get_config("tiny-cpu")
    a.model.depth = 99
    assert get_config("tiny-cpu").model.depth != 99


def test_overrides_parse_to_field_types():
    cfg = apply_overrides(get_config("tiny-cpu"), [
        "optim.base_lr=1e-3", "model.depth=6", "head.share_heads=true", "loss.centering=softmax_center",
        "train.epochs=3.0", "model.drop_path_rate=0",
    ])
    assert cfg.optim.base_lr == 0.001 and isinstance(cfg.optim.base_lr, float)
    assert cfg.model.depth == 6 and isinstance(cfg.model.depth, int)
    assert cfg.head.share_heads is True
    assert cfg.loss.centering == "softmax_center"
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.model.drop_path_rate == 0.0 and isinstance(cfg.model.drop_path_rate, float)


def test_overrides_do_not_mutate_input():
    cfg = get_config("tiny-cpu")
    apply_overrides(cfg, ["model.depth=7"])
    assert cfg.model.depth == get_config("tiny-cpu").model.depth


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ValueError, match=r"'optim.base_lrr'.*Did you mean 'optim.base_lr'"):
        apply_overrides(get_config("tiny-cpu"), ["optim.base_lrr=0.1"])
    with pytest.raises(ValueError, match=r"'modle.depth'.*Did you mean 'model.depth'"):
        apply_overrides(get_config("tiny-cpu"), ["modle.depth=3"])
    with pytest.raises(ValueError, match="Valid keys: .*train.batch_size"):
        apply_overrides(get_config("tiny-cpu"), ["nonsense=1"])


@pytest.mark.parametrize("override, pattern", [
    ("model.depth=abc", r"'model.depth' expects int, got 'abc'"),
    ("model.depth=2.5", r"'model.depth' expects int"),
    ("optim.base_lr=fast", r"'optim.base_lr' expects float"),
    ("head.share_heads=maybe", r"'head.share_heads' expects bool"),
    ("model.depth", r"not of the form key=value"),
    ("model=3", r"'model' is a section"),
    ("loss.centering=median", r"'loss.centering': must be 'sinkhorn_knopp' or 'softmax_center'"),
    ("crops.global_size=30", r"'crops.global_size': 30 is not a multiple of model.patch_size=8; use e.g. 32"),
    ("model.num_heads=5", r"'model.num_heads'"),
    ("train.precision=fp16", r"'train.precision'"),
    ("crops.mask_ratio_mode=random", r"'crops.mask_ratio_mode'"),
    ("model.rope_rescale_coords=2", r"'model.pos_embed'"),
    ("gram.teacher_scale=1.3", r"'gram.teacher_scale'"),
    ("gram.remove_neg=student", r"'gram.remove_neg'"),
    ("crops.blur_sigma_min=3.0", r"'crops.blur_sigma_max': need 0 < blur_sigma_min <= blur_sigma_max"),
    ("train.threads=-1", r"'train.threads': must be >= 0 \(0: auto"),
    ("train.num_workers=-2", r"'train.num_workers': must be >= 0"),
])
def test_bad_values_name_the_key(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        apply_overrides(get_config("tiny-cpu"), [override])


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(get_config("tiny-cpu"), ["model.depth=3", "optim.base_lr=0.002"])
    path = tmp_path / "run.yaml"
    save_config(cfg, str(path))
    loaded = get_config(str(path))
    assert config_to_dict(loaded) == config_to_dict(cfg)
    assert config_diff(loaded, cfg) == {}


def test_partial_yaml_keeps_defaults_and_checks_keys(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("model:\n  depth: 3\noptim:\n  base_lr: 0.01\n")
    cfg = load_config(str(path))
    assert cfg.model.depth == 3 and cfg.optim.base_lr == 0.01
    assert cfg.model.embed_dim == Config().model.embed_dim
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  detph: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown config key 'model.detph'.*'model.depth'"):
        load_config(str(bad))


def test_malformed_yaml_is_a_one_line_value_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  depth: 3\n optim: [\n")
    with pytest.raises(ValueError) as err:
        get_config(str(path))
    message = str(err.value)
    assert message.startswith(f"{path} is not valid YAML at line 3") and "\n" not in message


def test_unknown_recipe():
    with pytest.raises(ValueError, match=r"unknown config 'tiny_cpu'.*Did you mean 'tiny-cpu'"):
        get_config("tiny_cpu")


def test_config_diff_and_keys():
    a, b = get_config("tiny-cpu"), apply_overrides(get_config("tiny-cpu"), ["model.depth=2"])
    assert config_diff(a, b) == {"model.depth": (a.model.depth, 2)}
    keys = valid_keys()
    assert "optim.base_lr" in keys and "train.seed" in keys and len(keys) == len(set(keys))


def test_model_norm_eps_and_drop_path_mode_reach_the_backbone():
    from dinolite.train.meta_arch import build_backbone

    small = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.img_size=32"]
    official = build_backbone(apply_overrides(get_config("tiny-cpu"), small))
    assert official.blocks[0].drop_path_mode == "subset" and official.norm.eps == 1e-6
    rope = build_backbone(apply_overrides(get_config("tiny-cpu"), small + ["model.pos_embed=rope"]))
    assert rope.norm.eps == 1e-5 and rope.blocks[0].norm1.eps == 1e-5
    custom = build_backbone(apply_overrides(get_config("tiny-cpu"),
                                            small + ["model.norm_eps=1e-4", "model.drop_path_mode=mask"]))
    assert custom.norm.eps == 1e-4 and custom.blocks[0].drop_path_mode == "mask"
    with pytest.raises(ValueError, match="model.drop_path_mode"):
        apply_overrides(get_config("tiny-cpu"), ["model.drop_path_mode=bernoulli"])
