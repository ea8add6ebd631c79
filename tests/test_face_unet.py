"""The course face UNet: exact state-dict layout, block math, and the loader's errors."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import SHARED
from difflab.faces.model_io import load_face_unet, read_state_dict
from difflab.nets.face_unet import (
    FaceDenoiser,
    FaceUNet,
    FaceUNetConfig,
    ResBlock,
    SelfAttention,
    SinusoidalEmbedding,
)

SPEC = SHARED / "specs" / "face_unet_state_dict.txt"
requires_spec = pytest.mark.skipif(not SPEC.is_file(), reason=f"face UNet spec not present at {SPEC} (set DIFFLAB_SHARED)")


def read_spec():
    out = {}
    for line in SPEC.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split("\t")
        out[name] = tuple(int(s) for s in shape.split("x"))
    return out


def tiny(seed=0, base=8):
    torch.manual_seed(seed)
    return FaceUNet(FaceUNetConfig.tiny(base)).eval()


@requires_spec
def test_full_size_loads_state_dict_made_from_shipped_list_strictly():
    spec = read_spec()
    assert len(spec) == 427
    model = FaceUNet()
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == spec
    assert sum(math.prod(s) for s in spec.values()) == 113_673_283
    # A state dict in the course format, values from a seeded generator.
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in spec.items()}
    state["time.0.inv_freq"] = torch.exp(torch.arange(0, 128, 2).float() * (-math.log(10000.0) / 128))
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.up23.resblocks.skip.weight, state["up23.resblocks.skip.weight"])
    del state
    model.eval()
    with torch.inference_mode():
        eps = model(torch.randn(1, 3, 32, 32, generator=g), torch.tensor([999]))
    assert eps.shape == (1, 3, 32, 32)
    assert torch.isfinite(eps).all()


@requires_spec
def test_tiny_config_has_the_same_names_as_the_course_network():
    assert list(tiny().state_dict()) == list(read_spec())


def test_default_inv_freq_matches_the_course_formula():
    emb = SinusoidalEmbedding(128)
    expected = torch.exp(torch.arange(0, 128, 2).float() * (-math.log(10000.0) / 128))
    assert torch.allclose(emb.inv_freq, expected)
    t = torch.tensor([0, 7, 999])
    out = emb(t)
    # all sines first, then all cosines; t is not rescaled
    assert torch.allclose(out[:, :64], torch.sin(t[:, None].float() * expected), atol=1e-6)
    assert torch.allclose(out[:, 64:], torch.cos(t[:, None].float() * expected), atol=1e-6)


def test_self_attention_equals_explicit_softmax_over_keys():
    torch.manual_seed(0)
    att = SelfAttention(16, 4)
    for p in att.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 16, 5, 3)
    n = F.group_norm(x, 4, att.norm.weight, att.norm.bias, 1e-5)
    qkv = torch.einsum("oc,bchw->bohw", att.qkv.weight[:, :, 0, 0], n) + att.qkv.bias[None, :, None, None]
    q, k, v = (z.reshape(2, 16, 15) for z in qkv.split(16, dim=1))
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(16), dim=-1)  # over keys j
    a = torch.einsum("bij,bcj->bci", w, v).reshape(2, 16, 5, 3)
    expected = x + torch.einsum("oc,bchw->bohw", att.out.weight[:, :, 0, 0], a) + att.out.bias[None, :, None, None]
    assert torch.allclose(att(x), expected, atol=1e-5)


def test_resblock_adds_time_before_norm2_and_uses_a_1x1_skip():
    torch.manual_seed(0)
    rb = ResBlock(8, 16, 12, 4)
    x, temb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    h = rb.conv1(F.silu(F.group_norm(x, 4, rb.norm1.weight, rb.norm1.bias, 1e-5)))
    h = h + (F.silu(temb) @ rb.time[1].weight.T + rb.time[1].bias)[:, :, None, None]
    h = rb.conv2(F.silu(F.group_norm(h, 4, rb.norm2.weight, rb.norm2.bias, 1e-5)))
    expected = h + F.conv2d(x, rb.skip.weight, rb.skip.bias)
    assert torch.allclose(rb(x, temb), expected, atol=1e-5)
    assert isinstance(ResBlock(8, 8, 12, 4).skip, nn.Identity)


def test_output_shape_follows_input_and_rejects_bad_sides():
    model = tiny()
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 64, 32), torch.tensor([0, 999])).shape == (2, 3, 64, 32)
        with pytest.raises(ValueError, match="multiples of 32"):
            model(torch.randn(1, 3, 48, 48), torch.tensor([0]))


def test_denoiser_adapter_ignores_cond_and_channels_last_gives_same_eps():
    model = tiny()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 500])
    with torch.inference_mode():
        ref = model(x, t)
        a = FaceDenoiser(model)(x, t, None)
        b = FaceDenoiser(model, channels_last=True)(x, t, {"ignored": 1})
    assert torch.equal(a, ref)
    assert torch.allclose(b, ref, atol=1e-5)
    assert b.is_contiguous()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module"])
def test_loader_accepts_course_wrappers(tmp_path, wrap):
    model = tiny(seed=1)
    state = model.state_dict()
    if wrap == "state_dict":
        obj = {"state_dict": state, "epoch": 3}
    elif wrap == "module":
        obj = {f"module.{k}": v for k, v in state.items()}
    else:
        obj = state
    path = tmp_path / "UNet.pt"
    torch.save(obj, path)
    loaded = load_face_unet(path)  # widths read off the file
    assert loaded.config == FaceUNetConfig.tiny(8)
    assert not loaded.training
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_loader_names_missing_unexpected_and_shape_conflicts(tmp_path):
    state = tiny().state_dict()
    state.pop("up23.resblocks.skip.weight")
    state["extra.weight"] = torch.zeros(1)
    state["out.2.bias"] = torch.zeros(5)
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as e:
        load_face_unet(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing keys (1): up23.resblocks.skip.weight" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "shape conflicts (1): out.2.bias: file (5,) vs model (3,)" in msg


def test_loader_rejects_another_network(tmp_path):
    path = tmp_path / "digits.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 2)).state_dict(), path)
    with pytest.raises(ValueError, match=r"digits\.pt does not fit FaceUNet: missing keys \(427\)"):
        load_face_unet(path)


@pytest.mark.parametrize("content", ["text", "list", "empty", "nontensor"])
def test_loader_rejects_files_that_are_not_tensor_dicts(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "text":
        path.write_text("not a checkpoint")
    elif content == "list":
        torch.save([torch.zeros(1)], path)
    elif content == "empty":
        torch.save({}, path)
    else:
        torch.save({"down1.weight": 3}, path)
    with pytest.raises(ValueError, match=r"bad\.pt"):
        read_state_dict(path)


def test_loader_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_face_unet(tmp_path / "nothere.pt")
