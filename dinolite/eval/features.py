"""Frozen features: an image to a model input, and a dataset to [CLS] / patch-token tensors (one pass, no grad)."""
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm  # a text bar: in a notebook a widget bar would leave an empty box in the built book

from dinolite.models import check_image_size


def image_to_tensor(image, size: int | tuple = 224, patch_size: int | None = None) -> torch.Tensor:
    """PIL image (or [3, H, W] tensor in [0, 1]) -> ImageNet-normalised tensor [3, H, W] of `size`.

    size: int (a square) or (H, W). With patch_size, H and W must be multiples of it (a ViT cuts
    the image into whole patches).
    """
    import torchvision.transforms.functional as TF

    from dinolite.data.augment import normalize, to_float_tensor

    h, w = (size, size) if isinstance(size, int) else size
    if patch_size is not None:
        check_image_size(h, w, patch_size)
    x = TF.resize(to_float_tensor(image), [h, w], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return normalize(x.clamp(0, 1))


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _split_batch(batch):
    """A DataLoader batch -> (images, labels or None, masks or None)."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, dict):
        return batch["image"], batch.get("label"), batch.get("mask")
    if isinstance(batch, (list, tuple)):
        images = batch[0]
        labels = batch[1] if len(batch) > 1 else None
        masks = batch[2] if len(batch) > 2 else None
        return images, labels, masks
    raise ValueError(f"cannot read a batch of type {type(batch).__name__}: yield images, (images, labels) or (images, labels, masks)")


@torch.inference_mode()
def extract_features(
    model: torch.nn.Module,
    data,
    batch_size: int = 64,
    patch_tokens: bool = False,
    n_last_layers: int | None = None,
    device=None,
    amp: bool | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Run a frozen backbone over `data` and collect its features on the CPU (float32).

    data: a Dataset or DataLoader yielding images [3, H, W], (image, label) or
        (image, label, mask); or a Tensor of images [N, 3, H, W].
    patch_tokens: also return the final patch tokens as a grid.
    n_last_layers: also return the [CLS] and patch tokens of the last n blocks
        (model.get_intermediate_layers, each normalised by the final norm).
    amp: bf16 autocast; default on for CUDA, off for CPU.
    Returns dict with
        cls [N, D] (x_norm_clstoken), labels [N] and masks [N, H, W] when the data has them,
        patch [N, h, w, D] when patch_tokens, layer_cls [N, n, D] and (with patch_tokens)
        layer_patch [N, n, h, w, D] when n_last_layers.
    """
    if isinstance(data, torch.Tensor):
        if data.ndim != 4:
            raise ValueError(f"a tensor of images must be [N, 3, H, W], got shape {tuple(data.shape)}")
        loader = DataLoader(data, batch_size=batch_size)
    elif isinstance(data, DataLoader):
        loader = data
    elif isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    else:
        raise ValueError(f"data must be a Dataset, DataLoader or Tensor, got {type(data).__name__}")
    device = torch.device(device) if device is not None else _model_device(model)
    amp = device.type == "cuda" if amp is None else amp
    was_training = model.training
    model.eval()
    outputs = {}

    def add(key, value):
        outputs.setdefault(key, []).append(value.float().cpu())

    for batch in tqdm(loader, desc="extracting features", disable=not progress):
        images, labels, masks = _split_batch(batch)
        images = images.to(device, non_blocking=True)
        B, _, H, W = images.shape
        check_image_size(H, W, model.patch_size)
        h, w = H // model.patch_size, W // model.patch_size
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model.forward_features(images)
            add("cls", out["x_norm_clstoken"])
            if patch_tokens:
                add("patch", out["x_norm_patchtokens"].reshape(B, h, w, -1))
            if n_last_layers:
                layers = model.get_intermediate_layers(images, n=n_last_layers, return_class_token=True, norm=True)
                add("layer_cls", torch.stack([cls for _, cls in layers], dim=1))
                if patch_tokens:
                    add("layer_patch", torch.stack([patch.reshape(B, h, w, -1) for patch, _ in layers], dim=1))
        if labels is not None:
            add("labels", torch.as_tensor(labels))
        if masks is not None:
            add("masks", torch.as_tensor(masks))
    model.train(was_training)
    if not outputs:
        raise ValueError("data is empty")
    result = {key: torch.cat(values) for key, values in outputs.items()}
    for key in ("labels", "masks"):
        if key in result:
            result[key] = result[key].long()
    return result


def cls_mean_patch(cls: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """Concatenate [CLS] [N, D] with the mean patch token of patch [N, h, w, D] (or [N, P, D]) -> [N, 2D]."""
    return torch.cat([cls, patch.flatten(1, -2).mean(dim=1)], dim=-1)
