"""hubconf.py: torch.hub.load(<clone>, name, source="local", weights=PATH) for every DINOv2 and DINOv3 name."""
import importlib.util

import pytest
import torch

from dinolite.hub import HUB_MODELS, build_hub_model, export_official
from tests.cli_helpers import ROOT


def _hubconf():
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_hub_model_is_an_entry_point():
    hubconf = _hubconf()
    assert hubconf.dependencies == ["torch"]
    assert sorted(n for n in dir(hubconf) if not n.startswith("_") and callable(getattr(hubconf, n))) == sorted(HUB_MODELS)


def test_torch_hub_load_local_reads_the_weights_strictly(tmp_path):
    torch.manual_seed(3)
    reference = build_hub_model("dinov2_vits14")
    torch.save(export_official(reference), tmp_path / "w.pth")
    model = torch.hub.load(str(ROOT), "dinov2_vits14", source="local", weights=str(tmp_path / "w.pth"), verbose=False)
    assert not model.training
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    random = torch.hub.load(str(ROOT), "dinov3_vits16", source="local", verbose=False)  # weights=None: random init
    assert random.rope_embed is not None and random.num_register_tokens == 4 and random.patch_size == 16
    with pytest.raises(ValueError, match="not a PyTorch state dict of dinov2_vits14|does not fit"):
        (tmp_path / "page.pth").write_text("<html>login</html>")
        torch.hub.load(str(ROOT), "dinov2_vits14", source="local", weights=str(tmp_path / "page.pth"), verbose=False)


def test_a_missing_file_is_one_line_and_nothing_is_downloaded(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as error:
        torch.hub.load(str(ROOT), "dinov3_vitb16", source="local", weights=str(tmp_path / "none.pth"), verbose=False)
    assert "\n" not in str(error.value) and "dinolite never downloads" in str(error.value)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dinov2_vits14_pretrain.pth"):
        torch.hub.load(str(ROOT), "dinov2_vits14", source="local", pretrained=True, verbose=False)
