"""PyTorch -> Flax conversion: logits parity with timm / spec-built torch networks (train and
deploy forms, timm / DingXiaoH / Apple key names), arch inference, and strict key checking."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
nn = torch.nn

from cfws_jax.models import create_model  # noqa: E402
from converters.convert import convert_state_dict  # noqa: E402

torch.set_num_threads(2)


def randomize_torch(model: "nn.Module", seed: int) -> "nn.Module":
    """Random BN statistics/affine and fan-in scaled conv/linear weights; returns model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in**0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def numpy_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# FORMATS.md §2.6: DingXiaoH original <- timm names (applied in reverse here).
_TIMM_TO_DING = [
    (r"^stem\.", "stage0."),
    (r"^stages\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}."),
    (r"\.conv_kxk\.", ".rbr_dense."),
    (r"\.conv_1x1\.", ".rbr_1x1."),
    (r"\.identity\.", ".rbr_identity."),
    (r"\.attn\.fc1\.", ".se.down."),
    (r"\.attn\.fc2\.", ".se.up."),
    (r"\.reparam_conv\.", ".rbr_reparam."),
    (r"^head\.fc\.", "linear."),
]
# FORMATS.md §3.3: Apple MobileOne <- timm names.
_TIMM_TO_APPLE = [
    (r"^stem\.", "stage0."),
    (r"^stages\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}."),
    (r"\.conv_kxk\.", ".rbr_conv."),
    (r"\.conv_scale\.", ".rbr_scale."),
    (r"\.identity\.", ".rbr_skip."),
    (r"\.attn\.fc1\.", ".se.reduce."),
    (r"\.attn\.fc2\.", ".se.expand."),
    (r"^head\.fc\.", "linear."),
]


def rename(sd, table):
    out = {}
    for k, v in sd.items():
        for pat, rep in table:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


def torch_logits(model, x_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def assert_parity(result, ref, x_nhwc, num_classes=None):
    model = create_model(result.arch, deploy=result.form == "deploy", num_classes=num_classes)
    y = np.asarray(model.apply(result.variables, jnp.asarray(x_nhwc)))
    scale = np.abs(ref).max()
    assert scale > 0
    assert np.abs(y - ref).max() <= 1e-4 * scale, (result.arch, result.form, result.dialect)


def _inputs(hw, seed=0):
    return np.random.RandomState(seed).randn(2, hw, hw, 3).astype(np.float32)


def test_repvgg_a0_timm_and_dingxiaoh_train_and_deploy(tmp_path):
    tm = randomize_torch(timm.create_model("repvgg_a0", pretrained=False), 0)
    x = _inputs(64)
    ref = torch_logits(tm, x)
    sd = numpy_state_dict(tm)
    assert any(k.endswith("num_batches_tracked") for k in sd)
    res = convert_state_dict(sd)  # inferred
    assert (res.arch, res.form, res.dialect) == ("repvgg_a0", "train", "timm")
    assert set(res.variables) == {"params", "batch_stats"}
    assert_parity(res, ref, x)
    ding = rename(sd, _TIMM_TO_DING)
    assert "stage1.1.rbr_identity.running_var" in ding and "linear.weight" in ding
    res = convert_state_dict(ding)
    assert (res.arch, res.form, res.dialect) == ("repvgg_a0", "train", "dingxiaoh")
    assert_parity(res, ref, x)

    # through a torch.save file and the safe reader, when that module is available
    reader = pytest.importorskip("converters.torch_reader")
    path = tmp_path / "a0.pth"
    torch.save(tm.state_dict(), path)
    res = convert_state_dict(reader.load_state_dict(path), "repvgg_a0")
    assert_parity(res, ref, x)

    # deploy form produced by timm's own re-parameterization
    from timm.utils.model import reparameterize_model

    dm = reparameterize_model(tm)
    sd_dep = numpy_state_dict(dm)
    assert "stem.reparam_conv.weight" in sd_dep
    np.testing.assert_allclose(torch_logits(dm, x), ref, atol=1e-5 * np.abs(ref).max())
    for state, dialect in ((sd_dep, "timm"), (rename(sd_dep, _TIMM_TO_DING), "dingxiaoh")):
        res = convert_state_dict(state)
        assert (res.arch, res.form, res.dialect) == ("repvgg_a0", "deploy", dialect)
        assert set(res.variables) == {"params"}
        assert_parity(res, ref, x)


@pytest.mark.parametrize("arch", ["repvgg_b1g4", "repvgg_d2se"])
def test_repvgg_grouped_and_se_train_form(arch):
    tm = randomize_torch(timm.create_model(arch, pretrained=False, num_classes=10), 1)
    x = _inputs(64, 1)
    ref = torch_logits(tm, x)
    sd = numpy_state_dict(tm)
    for state, dialect in ((sd, "timm"), (rename(sd, _TIMM_TO_DING), "dingxiaoh")):
        res = convert_state_dict(state)  # 10 classes, but no CIFAR twin: unambiguous
        assert (res.arch, res.form, res.dialect) == (arch, "train", dialect)
        assert_parity(res, ref, x, num_classes=10)


# ---------------------------------------------------------------- MobileOne from the spec (Apple naming)


class _ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k, stride, pad, groups):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class _SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.reduce = nn.Conv2d(c, int(c * 0.0625), 1, bias=True)
        self.expand = nn.Conv2d(int(c * 0.0625), c, 1, bias=True)

    def forward(self, x):
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(s))))


class _MOBlock(nn.Module):
    """FORMATS.md §3.1 train-form block: relu(se(sum(rbr_conv) + rbr_scale + rbr_skip))."""

    def __init__(self, cin, cout, k, stride, groups, branches, se=False):
        super().__init__()
        pad = k // 2
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_conv = nn.ModuleList([_ConvBN(cin, cout, k, stride, pad, groups) for _ in range(branches)])
        self.rbr_scale = _ConvBN(cin, cout, 1, stride, 0, groups) if k > 1 else None
        self.se = _SE(cout) if se else nn.Identity()

    def forward(self, x):
        y = sum(b(x) for b in self.rbr_conv)
        if self.rbr_scale is not None:
            y = y + self.rbr_scale(x)
        if self.rbr_skip is not None:
            y = y + self.rbr_skip(x)
        return torch.relu(self.se(y))


class _MobileOne(nn.Module):
    def __init__(self, widths, blocks, branches, num_classes, stem_stride, strides):
        super().__init__()
        cin = min(64, int(64 * widths[0]))
        self.stage0 = _MOBlock(3, cin, 3, stem_stride, 1, 1)
        for s in range(4):
            planes = int((64, 128, 256, 512)[s] * widths[s])
            entries = []
            for i in range(blocks[s]):
                entries.append(_MOBlock(cin, cin, 3, strides[s] if i == 0 else 1, cin, branches))
                entries.append(_MOBlock(cin, planes, 1, 1, 1, branches))
                cin = planes
            setattr(self, f"stage{s + 1}", nn.Sequential(*entries))
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        for s in range(5):
            x = getattr(self, f"stage{s}")(x)
        return self.linear(x.mean(dim=(2, 3)))


def test_mobileone_spec_built_torch_apple_names():
    # mobileone_s0_cifar: S0 widths, 4 conv branches, stride-1 stem, stage strides 1,2,2,2.
    tm = randomize_torch(_MobileOne((0.75, 1.0, 1.0, 2.0), (2, 8, 10, 1), 4, 10, 1, (1, 2, 2, 2)), 2)
    x = _inputs(32, 2)
    ref = torch_logits(tm, x)
    sd = numpy_state_dict(tm)
    assert "stage1.1.rbr_conv.3.bn.running_var" in sd and "stage2.0.rbr_scale.conv.weight" in sd
    res = convert_state_dict(sd)  # S0 vs S0-cifar: broken by the 10-class head
    assert (res.arch, res.form, res.dialect) == ("mobileone_s0_cifar", "train", "apple")
    assert_parity(res, ref, x)


def test_mobileone_timm_train_deploy_and_apple_names():
    from timm.utils.model import reparameterize_model

    tm = randomize_torch(timm.create_model("mobileone_s0", pretrained=False), 3)
    x = _inputs(64, 3)
    ref = torch_logits(tm, x)
    sd = numpy_state_dict(tm)
    for state, dialect in ((sd, "timm"), (rename(sd, _TIMM_TO_APPLE), "apple")):
        res = convert_state_dict(state)
        assert (res.arch, res.form, res.dialect) == ("mobileone_s0", "train", dialect)
        assert_parity(res, ref, x)
    sd_dep = numpy_state_dict(reparameterize_model(tm))
    for state, dialect in ((sd_dep, "timm"), (rename(sd_dep, _TIMM_TO_APPLE), "apple")):
        res = convert_state_dict(state)
        assert (res.arch, res.form, res.dialect) == ("mobileone_s0", "deploy", dialect)
        assert_parity(res, ref, x)


def test_mobileone_s4_se_timm():
    tm = randomize_torch(timm.create_model("mobileone_s4", pretrained=False, num_classes=10), 4)
    # Non-negative SE weights: with random signed ones, cancellation in the 12 stacked SE gates
    # amplifies float32 rounding ~2x per block (a float64 run agrees to 1e-10, so not a wiring issue).
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if ".attn." in name:
                p.abs_()
    x = _inputs(64, 4)
    res = convert_state_dict(numpy_state_dict(tm), "mobileone_s4")
    assert (res.form, res.dialect) == ("train", "timm")
    assert "se" in res.variables["params"]["stage3_10"] and "se" not in res.variables["params"]["stage3_9"]
    assert_parity(res, torch_logits(tm, x), x, num_classes=10)


def test_mobileone_s0_real_deploy_weights(shared_data):
    """Apple's fused S0 ImageNet weights with a golden input/logits pair (shared data)."""
    with np.load(shared_data("mobileone_s0_deploy_awkrail.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    x = arrays.pop("_ref_input_apple_chw").transpose(1, 2, 0)[None]
    golden = arrays.pop("_ref_logits")
    res = convert_state_dict(arrays)
    assert (res.arch, res.form, res.dialect) == ("mobileone_s0", "deploy", "apple")
    y = np.asarray(create_model("mobileone_s0", deploy=True).apply(res.variables, jnp.asarray(x)))[0]
    np.testing.assert_allclose(y, golden, atol=1e-4 * max(1.0, np.abs(golden).max()))
    assert int(np.argmax(y)) == int(np.argmax(golden)) == 957


# ---------------------------------------------------------------- strictness and inference errors


def _a0_10_classes_sd(deploy=False):
    tm = randomize_torch(timm.create_model("repvgg_a0", pretrained=False, num_classes=10), 5)
    if deploy:
        from timm.utils.model import reparameterize_model

        tm = reparameterize_model(tm)
    return numpy_state_dict(tm)


def test_all_key_problems_reported_in_one_error():
    sd = rename(_a0_10_classes_sd(), _TIMM_TO_DING)
    del sd["stage2.3.rbr_1x1.bn.running_var"]
    sd["stage9.0.rbr_dense.conv.weight"] = np.zeros((1,), np.float32)
    sd["stage1.1.rbr_identity.weight"] = np.zeros((7,), np.float32)
    with pytest.raises(ValueError) as err:
        convert_state_dict(sd, "repvgg_a0")
    msg = str(err.value)
    assert "missing keys (1): stage2.3.rbr_1x1.bn.running_var" in msg
    assert "unexpected keys (1): stage9.0.rbr_dense.conv.weight" in msg
    assert "stage1.1.rbr_identity.weight: got (7,), expected (48,)" in msg
    assert "repvgg_a0 (train form, dingxiaoh keys)" in msg
    # the CIFAR variant has an identity branch in stage1.0 (stride 1): reported as missing
    with pytest.raises(ValueError, match=r"missing keys \(4\): stage1\.0\.rbr_identity\.bias"):
        convert_state_dict(rename(_a0_10_classes_sd(), _TIMM_TO_DING), "repvgg_a0_cifar")


def test_num_classes_mismatch_and_ambiguity():
    sd = _a0_10_classes_sd()
    with pytest.raises(ValueError, match=r"head\.fc\.weight: got \(10, 1280\), expected \(5, 1280\)"):
        convert_state_dict(sd, "repvgg_a0", num_classes=5)
    assert convert_state_dict(sd).arch == "repvgg_a0"  # train form: no identity in stage1.0
    # deploy form: A0 and A0-cifar differ only in strides; the 10-class head picks the CIFAR
    # variant, another head size is ambiguous
    sd = _a0_10_classes_sd(deploy=True)
    assert convert_state_dict(sd).arch == "repvgg_a0_cifar"
    sd7 = dict(sd, **{"head.fc.weight": np.zeros((7, 1280), np.float32), "head.fc.bias": np.zeros(7, np.float32)})
    with pytest.raises(ValueError, match=r"ambiguous architecture: candidates \['repvgg_a0', 'repvgg_a0_cifar'\]"):
        convert_state_dict(sd7)
    res = convert_state_dict(sd7, "repvgg_a0")
    assert res.form == "deploy" and res.variables["params"]["linear"]["kernel"].shape == (1280, 7)


def test_unrecognised_checkpoints():
    with pytest.raises(ValueError, match="cannot recognise the checkpoint dialect"):
        convert_state_dict({"features.0.weight": np.zeros((3, 3, 3, 3), np.float32)})
    sd = _a0_10_classes_sd()
    sd["stem.conv_kxk.conv.weight"] = np.zeros((40, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="no registered architecture"):
        convert_state_dict(sd)
    with pytest.raises(ValueError, match="unknown architecture 'repvgg_z9'"):
        convert_state_dict(sd, "repvgg_z9")
