"""The short tiny-cpu run must really train: schedules measured in steps of *this* run.

A recipe of a few hundred steps inherits DINOv2 lengths given in epochs; if an "epoch" were
longer than the run, the lr would still be warming up at the end, the prototype layer would be
frozen throughout, or the teacher temperature would never reach its final value.
"""
import torch

from dinolite.ema import ema_update_
from dinolite.train import get_config
from dinolite.train.optim import schedule_values


def _values(cfg):
    total, epoch_length = cfg.total_steps, cfg.train.epoch_length
    batch = cfg.train.batch_size
    return [schedule_values(cfg, s, total, epoch_length, batch) for s in range(total)]


def test_tiny_cpu_schedules_fit_inside_the_run():
    cfg = get_config("tiny-cpu")
    values = _values(cfg)
    total = cfg.total_steps
    peak = cfg.optim.base_lr * (cfg.train.batch_size / 1024) ** 0.5
    # warm-up ends in the first quarter of the run and reaches the sqrt-scaled peak
    assert max(v.lr for v in values[: total // 4 + 1]) == max(v.lr for v in values)
    assert abs(max(v.lr for v in values) - peak) < 1e-9
    # the prototype layer trains for at least 80% of the run, with the backbone's lr once unfrozen
    first_unfrozen = next(s for s, v in enumerate(values) if v.last_layer_lr > 0)
    assert first_unfrozen <= total // 5
    assert all(v.last_layer_lr == 0 for v in values[:first_unfrozen])
    assert all(v.last_layer_lr == v.lr for v in values[first_unfrozen:])
    # the teacher temperature reaches its final value before half of the run
    assert abs(values[total // 2].teacher_temp - cfg.loss.teacher_temp) < 1e-12
    assert values[0].teacher_temp == cfg.loss.warmup_teacher_temp
    # the teacher momentum rises from its start towards its end, never reaching 1 inside the run
    assert abs(values[0].momentum - cfg.optim.momentum_teacher) < 1e-12
    assert values[0].momentum < values[-1].momentum < 1.0


def test_ema_moves_the_teacher_towards_the_student():
    teacher, student = torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(0.0)
    ema_update_(teacher, student, momentum=0.9)  # teacher = 0.9 * teacher + 0.1 * student
    assert torch.allclose(teacher.weight, torch.full((2, 2), 0.9))
    assert torch.equal(student.weight, torch.zeros(2, 2))


def test_knn_splits_follow_the_training_data_style():
    from dinolite.data import SyntheticShapes
    from dinolite.train.run import knn_datasets

    cfg = get_config("tiny-cpu")
    for style in SyntheticShapes.styles:
        data = SyntheticShapes(40, 32, seed=3, style=style)
        train_set, test_set = knn_datasets(data, cfg)
        assert train_set.style == style and test_set.style == style
        # the kNN memory holds the training images themselves, resized to the global crop size
        torch.testing.assert_close(train_set[5][0], SyntheticShapes(40, 32, seed=3, style=style,
                                                                     transform=train_set.transform)[5][0])
    # kNN items are (image, label) even when the training data carry masks
    masked = SyntheticShapes(40, 32, seed=3, return_mask=True)
    assert all(len(split[0]) == 2 for split in knn_datasets(masked, cfg))


def test_knn_splits_of_the_textures_are_new_images_of_the_same_classes():
    from dinolite.data import SyntheticTextures, build_dataset
    from dinolite.train.run import knn_datasets

    cfg = get_config("tiny-cpu")
    train_set, test_set = knn_datasets(build_dataset("textures:n=60,size=32,seed=2"), cfg)
    assert isinstance(test_set, SyntheticTextures) and len(train_set) == 60 and len(test_set) == cfg.train.knn_test_size
    assert [test_set[i][1] for i in range(12)] == list(range(12))
    torch.testing.assert_close(train_set[7][0], SyntheticTextures(60, 32, seed=2, transform=train_set.transform)[7][0])
    assert not torch.equal(train_set[7][0], test_set[7][0])


def test_crop_config_sets_the_augmentation_blur():
    from dinolite.train.data import build_augmentation

    cfg = get_config("tiny-cpu")
    augmentation = build_augmentation(cfg)
    assert augmentation.blur_sigma == (cfg.crops.blur_sigma_min, cfg.crops.blur_sigma_max)
    sigmas = [augmentation(torch.rand(3, 32, 32), generator=torch.Generator().manual_seed(seed),
                           return_params=True)["params"]["global"][0]["blur_sigma"] for seed in range(20)]
    assert all(cfg.crops.blur_sigma_min <= s <= cfg.crops.blur_sigma_max for s in sigmas)  # first crop: always blurred
    assert max(sigmas) - min(sigmas) > 0.5 * (cfg.crops.blur_sigma_max - cfg.crops.blur_sigma_min)
