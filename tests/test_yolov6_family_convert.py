"""YOLOv6 m / l / base / P6 / QARepVGG checkpoints -> registry names (converters/yolov6.py), from
the key layouts the spec gives (FORMATS_YOLOV6_LARGE.md §4.17, §4.19; FORMATS_YOLOV6_QA.md §4.25,
§4.27), without torch and without allocating the big models' weights.

The state dicts are synthesised from each registered model's expected keys and shapes
(:func:`converters.yolov6.key_table`, itself derived from the Flax model) as zero-stride views,
plus what release files carry besides (``detect.proj*``, ``num_batches_tracked``), in 0.2.x/0.3.x
naming or re-nested to 0.4.x naming (:func:`v04_keys`, written from LARGE §4.17.4). Parity with
PyTorch is tested with the torch peers in tests/test_yolov6_family_models*.py.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from converters.convert import convert_state_dict
from converters.torch_reader import StateDictSource
from converters.yolov6 import identify_yolov6, key_table

P5_V2 = ("yolov6m_v2", "yolov6l_v2", "yolov6l_relu_v2", "yolov6m_base", "yolov6l_base")
V3 = ("yolov6m_v3", "yolov6l_v3", "yolov6n6", "yolov6s6", "yolov6m6", "yolov6l6")
QA = ("yolov6n_qa", "yolov6s_qa", "yolov6m_qa", "yolov6n_qav2", "yolov6s_qav2", "yolov6m_qav2")
STEM_CLASS = {  # pickled class of backbone.stem per basic block (LARGE §4.12.1, QA §4.25), 0.3.x / 0.4.x
    "repvgg": ("RepVGGBlock", "RepVGGBlock"), "qarepvgg": ("QARepVGGBlock", "QARepVGGBlock"),
    "qarepvggv2": ("QARepVGGBlockV2", "QARepVGGBlockV2"), "conv_silu": ("ConvWrapper", "ConvBNSiLU"),
    "conv_relu": ("SimConvWrapper", "ConvBNReLU"),
}
# What a file of each model resolves to WITHOUT pickled class names (train form, deploy form).
AMBIGUOUS_L = "ambiguous YOLOv6 checkpoint: yolov6l_base, yolov6l_v2"
NO_CLASSES = {
    "yolov6l_v2": (AMBIGUOUS_L, AMBIGUOUS_L), "yolov6l_base": (AMBIGUOUS_L, AMBIGUOUS_L),
    **{q: (f"ambiguous YOLOv6 checkpoint: {q.split('_')[0]}_qa, {q.split('_')[0]}_qav2", q.split("_")[0] + "_v3")
       for q in QA},
}


def _block(arch: str) -> str:
    from cfws_jax.models import registry

    return registry.get_config(arch).block


def synth(arch: str, form: str, num_classes: int | None = None, fill: float = 0.5) -> dict:
    """A release-like state dict of ``arch`` (zero-stride views: no memory), 0.3.x naming."""
    sd = {k: np.broadcast_to(np.float16(fill), leaf.shape) for k, leaf in key_table(arch, form, num_classes).items()}
    sd["detect.proj"] = np.arange(17, dtype=np.float16)
    sd["detect.proj_conv.weight"] = np.arange(17, dtype=np.float16).reshape(1, 17, 1, 1)
    if form == "train":
        sd.update({k[:-len("running_var")] + "num_batches_tracked": np.zeros((), np.int64)
                   for k in list(sd) if k.endswith("running_var")})
    return sd


def v04_keys(sd: dict, bias: bool = False) -> dict:
    """0.3.x -> 0.4.x key nesting (LARGE §4.17.4): every plain conv + BN module (not a RepVGG
    branch, not a basic block, not a QA block's own BN_post) gains a ``block``; the SPPF block its ``sppf`` / ``cspsppf``; the
    basic blocks' train-form conv biases are dropped unless ``bias``."""
    csp = any(re.match(r"^backbone\.ERBlock_[56]\.2\.cv7\.", k) for k in sd)
    out = {}
    for k, v in sd.items():
        base = k[:-len("conv.bias")]
        if not bias and k.endswith(".block.conv.bias") and base + "bn.weight" in sd:
            continue
        m = re.match(r"^(.*)\.(conv|bn)\.([a-z_]+)$", k)
        n = k
        if m and m.group(1) + ".conv.weight" in sd and not m.group(1).endswith(("rbr_dense", "rbr_1x1", ".block")):
            n = f"{m.group(1)}.block.{m.group(2)}.{m.group(3)}"
        out[re.sub(r"^(backbone\.ERBlock_[56]\.2)\.", r"\1.cspsppf." if csp else r"\1.sppf.", n)] = v
    return out


def classes_for(arch: str, v04: bool = False) -> dict:
    block = _block(arch)
    cls = {"": "yolov6.models.yolo.Model", "backbone.stem": "yolov6.layers.common." + STEM_CLASS[block][v04]}
    if block == "qarepvggv2":
        cls["backbone.ERBlock_2.1.conv1.rbr_avg"] = "torch.nn.modules.pooling.AvgPool2d"
    return cls


def _error(sd, arch=None, **kw) -> str:
    with pytest.raises(ValueError) as e:
        identify_yolov6(sd, arch, **kw)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 2000
    return msg


# ----------------------------------------------------------------------------- fingerprints

@pytest.mark.parametrize("arch", P5_V2 + V3 + QA)
def test_every_release_layout_resolves(arch):
    """Plain and deploy state dicts, 0.3.x naming and (v3.0-era code) 0.4.x naming, with the
    pickled class names of a release file: the registry name; without them: the name, or one
    line naming the candidates and the --arch values."""
    namings = [False, True] if arch not in P5_V2 else [False]
    for form in ("train", "deploy"):
        for v04 in namings:
            sd = synth(arch, form)
            if v04:
                sd = v04_keys(sd)
            idf = identify_yolov6(sd, pickled_classes=classes_for(arch, v04))
            assert (idf.arch, idf.form) == (arch, form), (form, v04)
            assert idf.dialect == ("yolov6-0.4" if v04 else "yolov6")
            assert idf.dropped == ("detect.proj", "detect.proj_conv.weight")
            conv_block = _block(arch).startswith("conv_")
            assert bool(idf.filled) == (v04 and conv_block and form == "train")
            want = NO_CLASSES.get(arch, (arch, arch))[form == "deploy"]
            if want.startswith("ambiguous"):
                msg = _error(sd)
                assert msg.startswith(want) and "pass --arch" in msg, msg
                assert identify_yolov6(sd, arch).arch == arch  # --arch decides
            else:
                assert identify_yolov6(sd).arch == want, (form, v04)


def test_l_v2_against_l_base_by_class_names():
    """v2.0 l (SiLU) and l_base (ReLU): identical keys; the pickled stem class decides, and
    --arch must agree with it."""
    sd = synth("yolov6l_v2", "train")
    assert identify_yolov6(sd, pickled_classes=classes_for("yolov6l_v2")).arch == "yolov6l_v2"
    assert identify_yolov6(sd, pickled_classes=classes_for("yolov6l_base")).arch == "yolov6l_base"
    msg = _error(sd)
    assert "yolov6l_base, yolov6l_v2" in msg and "--arch yolov6l_base or --arch yolov6l_v2" in msg
    assert identify_yolov6(sd, "yolov6l").arch == "yolov6l_v2"  # the alias names the _v series
    msg = _error(sd, "yolov6l_v2", pickled_classes=classes_for("yolov6l_base"))
    assert "SimConvWrapper" in msg and "conv_relu" in msg and "yolov6l_v2 (conv_silu)" in msg


def test_qa_v1_against_v2_by_avg_branch():
    """V1 / V2 have identical keys (QA §4.27): an ``rbr_avg`` child decides, over the class name."""
    sd = synth("yolov6s_qa", "train")
    assert identify_yolov6(sd, pickled_classes=classes_for("yolov6s_qa")).arch == "yolov6s_qa"
    assert identify_yolov6(sd, pickled_classes=classes_for("yolov6s_qav2")).arch == "yolov6s_qav2"
    odd = {**classes_for("yolov6s_qa"), "neck.Rep_p3.conv1.rbr_avg": "torch.nn.modules.pooling.AvgPool2d"}
    assert identify_yolov6(sd, pickled_classes=odd).arch == "yolov6s_qav2"
    msg = _error(sd)
    assert "--arch yolov6s_qa or --arch yolov6s_qav2" in msg
    # a plain RepVGG class on QA keys contradicts the keys
    assert "RepVGGBlock" in _error(sd, pickled_classes=classes_for("yolov6s_v3"))


def test_qa_upstream_deploy_bn_is_folded():
    """An upstream-deploy QA block keeps BN_post next to rbr_reparam (QA §4.24): folded here."""
    rng = np.random.default_rng(0)
    sd = {k: rng.normal(size=v.shape).astype(np.float16) for k, v in synth("yolov6n_qa", "deploy").items()}
    for k in [k for k in sd if k.endswith(".rbr_reparam.bias")]:
        o = sd[k].shape[0]
        p = k[:-len("rbr_reparam.bias")]
        sd.update({p + "bn.weight": rng.uniform(0.5, 1.5, o).astype(np.float16),
                   p + "bn.bias": rng.normal(size=o).astype(np.float16),
                   p + "bn.running_mean": rng.normal(size=o).astype(np.float16),
                   p + "bn.running_var": rng.uniform(0.5, 1.5, o).astype(np.float16),
                   p + "bn.num_batches_tracked": np.zeros((), np.int64)})
    res = convert_state_dict(sd)
    assert (res.arch, res.form) == ("yolov6n_qa", "deploy")  # QA evidence: the BN_post keys
    p = "backbone.ERBlock_3.1.conv1."
    g, b, m, v = (sd[p + f"bn.{n}"].astype(np.float64) for n in ("weight", "bias", "running_mean", "running_var"))
    t = g / np.sqrt(v + 1e-3)
    w = sd[p + "rbr_reparam.weight"].astype(np.float64) * t[:, None, None, None]
    got = res.variables["params"]["backbone"]["ERBlock_3_1"]["conv1"]["rbr_reparam"]
    np.testing.assert_allclose(got["kernel"], w.transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["bias"], b + (sd[p + "rbr_reparam.bias"] - m) * t, rtol=1e-5, atol=1e-5)
    assert convert_state_dict(sd, pickled_classes=classes_for("yolov6n_qav2")).arch == "yolov6n_qav2"


def test_values_alpha_transpose_and_absent_biases():
    """Values land in the Flax layout: conv OIHW -> HWIO, BottleRep alpha [1], ConvTranspose
    [I, O, 2, 2] -> [1, 1, I, 4O]; a 0.4.x train file without the basic blocks' conv biases
    (l / l6 / base re-saves, LARGE §4.20) converts with those biases 0; both forms of a 0.4.x
    file with the biases kept convert too."""
    sd = synth("yolov6m_base", "train")
    alpha, tw, stem = "backbone.ERBlock_3.1.m.block.2.alpha", "neck.upsample1.upsample_transpose.weight", \
        "backbone.ERBlock_2.0.block.conv.weight"
    sd[alpha] = np.array([0.75], np.float16)
    sd[tw] = np.arange(np.prod(sd[tw].shape), dtype=np.float32).reshape(sd[tw].shape).astype(np.float16)
    sd[stem] = np.random.default_rng(1).normal(size=sd[stem].shape).astype(np.float16)
    res = convert_state_dict(v04_keys(sd), "yolov6m_base")
    assert (res.arch, res.form, res.dialect) == ("yolov6m_base", "train", "yolov6-0.4")
    params = res.variables["params"]
    assert params["backbone"]["ERBlock_3_1"]["m"]["block_2"]["alpha"].tolist() == [0.75]
    k = params["neck"]["upsample1"]["upsample_transpose"]["kernel"]
    i, o = sd[tw].shape[:2]
    assert k.shape == (1, 1, i, 4 * o) and k[0, 0, 3, 2 * o + 5] == sd[tw][3, 5, 1, 0]
    np.testing.assert_array_equal(params["backbone"]["ERBlock_2_0"]["block"]["conv"]["kernel"],
                                  sd[stem].astype(np.float32).transpose(2, 3, 1, 0))
    assert len(res.filled) == 1 + 4 + 2 * (2 + 5 + 7 + 2 + 4 * 5)  # stem, ERBlock_k.0, BottleRep convs
    assert all(k.endswith(".block.conv.bias") for k in res.filled)
    assert not params["backbone"]["stem"]["block"]["conv"]["bias"].any()
    assert identify_yolov6(v04_keys(sd, bias=True), "yolov6m_base").filled == ()


# ----------------------------------------------------------------------------- errors

def test_arch_that_contradicts_the_file():
    n6 = synth("yolov6n6", "train")
    msg = _error(n6, "yolov6m")
    assert "backbone.ERBlock_6" in msg and "P5 model" in msg and "fit yolov6n6" in msg
    assert "yolov6m is one of yolov6m_v2, yolov6m_v3" in msg
    msg = _error(synth("yolov6m_v3", "train"), "yolov6m6")
    assert "P6 model" in msg and "fit yolov6m_v3" in msg
    msg = _error(synth("yolov6l_v3", "deploy"), "yolov6l_relu_v2")
    assert "neck.Bifusion0" in msg and "fit yolov6l_v3" in msg
    msg = _error(synth("yolov6l_relu_v2", "train"), "yolov6l_v2")
    assert "backbone.stem.rbr_1x1.conv.weight (RepVGG blocks)" in msg and "fit yolov6l_relu_v2" in msg
    msg = _error(synth("yolov6m_base", "train"), "yolov6m_v2")
    assert "backbone.stem.block.conv.weight (conv + BN basic blocks" in msg and "fit yolov6m_base" in msg


def test_truncated_bepc3_alpha_shape_and_dfl_width():
    sd = synth("yolov6m_v3", "train")
    cut = {k: v for k, v in sd.items() if not k.startswith("neck.Rep_n4.m.block.1.")}
    msg = _error(cut)
    assert msg.startswith("state dict does not fit yolov6m_v3 (train form)")
    assert "missing keys" in msg and "neck.Rep_n4.m.block.1.alpha" in msg
    cut = {k: v for k, v in sd.items() if not k.startswith("backbone.ERBlock_3.1.m.block.1.")}
    msg = _error(cut)  # the backbone depth no longer fits any model: the closest one is named
    assert "closest yolov6m_v3" in msg and "backbone.ERBlock_3.1 has 2 BottleReps" in msg
    bad = {**sd, "backbone.ERBlock_2.1.m.conv1.alpha": np.ones(2, np.float16)}
    msg = _error(bad)
    assert "backbone.ERBlock_2.1.m.conv1.alpha (2,) (expected (1,), BottleRep alpha is one learned scalar)" in msg
    m6 = synth("yolov6m6", "deploy")
    level2 = {**m6, "detect.reg_preds.2.weight": np.zeros((60, 384, 1, 1), np.float16),
              "detect.reg_preds.2.bias": np.zeros(60, np.float16)}
    msg = _error(level2)
    assert "detect.reg_preds.2.weight (60, 384, 1, 1) (expected (68, 384, 1, 1), box channels 60" in msg
    every = {k: (np.zeros((36, *v.shape[1:]), np.float16) if k.startswith("detect.reg_preds.") else v)
             for k, v in m6.items()}
    msg = _error(every)
    assert "closest yolov6m6" in msg and "(DFL boxes, reg_max 8)" in msg and "expects 68 box channels" in msg


def _fake_reader(monkeypatch, sd, classes=None):
    import converters.torch_reader as tr

    src = StateDictSource(sd, "torch-zip", "model", None, (), classes or {})
    monkeypatch.setattr(tr, "read_state_dict", lambda *a, **k: src)


@pytest.mark.parametrize("case", ["p6 with --arch yolov6m", "truncated BepC3", "alpha shape", "DFL width",
                                  "ambiguous l"])
def test_cli_bad_family_input_is_one_line(tmp_path, monkeypatch, capsys, case):
    """Through ``cfws-jax convert``: exit 1, one ``cfws-jax convert: error:`` line, no traceback.
    The P6 case reads a real (n6, fp16 .npz) file; the others hand the command big state dicts
    as zero-stride views through a replaced reader."""
    from cfws_jax.cli import main

    argv = ["convert", "--checkpoint", str(tmp_path / "model.pt"), "--out", str(tmp_path / "out")]
    if case == "p6 with --arch yolov6m":
        np.savez(tmp_path / "n6.npz", **synth("yolov6n6", "deploy"))
        argv[2], needle = str(tmp_path / "n6.npz"), "backbone.ERBlock_6"
        argv += ["--arch", "yolov6m"]
    elif case == "truncated BepC3":
        sd = synth("yolov6l_v3", "train")
        _fake_reader(monkeypatch, {k: v for k, v in sd.items() if ".Rep_p3.m.block.4." not in k})
        needle = "missing keys 13 (neck.Rep_p3.m.block.4.alpha"
    elif case == "alpha shape":
        _fake_reader(monkeypatch, {**synth("yolov6m6", "deploy"), "neck.Rep_n6.m.conv1.alpha": np.ones((1, 1), np.float16)})
        needle = "neck.Rep_n6.m.conv1.alpha (1, 1) (expected (1,)"
    elif case == "DFL width":
        sd = synth("yolov6l_v3", "deploy")
        _fake_reader(monkeypatch, {**sd, "detect.reg_preds.1.weight": np.zeros((4, 256, 1, 1), np.float16),
                                   "detect.reg_preds.1.bias": np.zeros(4, np.float16)})
        needle = "detect.reg_preds.1.weight (4, 256, 1, 1) (expected (68, 256, 1, 1), box channels 4: ltrb boxes"
    else:
        _fake_reader(monkeypatch, synth("yolov6l_base", "deploy"))
        needle = "pass --arch yolov6l_base or --arch yolov6l_v2"
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cfws-jax convert: error: ") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_release_files_tell_qa_v1_from_v2_by_pickled_classes(tmp_path, capsys):
    """The torch peers (tests/yolov6_torch.py) saved as releases: the reader reports every
    module's class (``pickled_classes``) and ``cfws-jax convert`` picks V1 / V2 without --arch."""
    pytest.importorskip("torch")
    pytest.importorskip("addict")
    yt = pytest.importorskip("yolov6_torch")
    from cfws_jax.cli import main
    from cfws_jax.io import read_metadata
    from converters.module_classes import YOLOV6_MODULE_CLASSES
    from converters.torch_reader import read_state_dict

    for name, cls in (("yolov6n_qa", "QARepVGGBlock"), ("yolov6n_qav2", "QARepVGGBlockV2")):
        try:
            yt.save_release(yt.build(name), tmp_path / f"{name}.pt")
        except ImportError as e:
            pytest.skip(str(e))
        src = read_state_dict(tmp_path / f"{name}.pt", module_classes=YOLOV6_MODULE_CLASSES)
        assert src.pickled_classes[""] == "yolov6.models.yolo.Model"
        assert src.pickled_classes["backbone.stem"] == f"yolov6.layers.common.{cls}"
        assert any(p.endswith(".rbr_avg") for p in src.pickled_classes) == name.endswith("v2")
        if name.endswith("v2"):  # the command line once (orbax writes are slow)
            assert main(["convert", "--checkpoint", str(tmp_path / f"{name}.pt"), "--out", str(tmp_path / name)]) == 0
            assert f"arch        {name}" in capsys.readouterr().out
            assert read_metadata(tmp_path / name)["metadata"]["arch"] == name
        else:
            assert convert_state_dict(src.state_dict, pickled_classes=src.pickled_classes).arch == name


def test_converter_equals_the_peer_mapping_and_04_biases():
    """A real torch network (yolov6detect classes, m_base: SimConvWrapper blocks, BottleRep alpha,
    v2.0 PAN transposes): the converter's Flax variables equal the peer's independent module-type
    mapping (``yolov6_torch.to_flax_variables``) exactly; its 0.4.x re-nesting (basic-block conv
    biases folded away, LARGE §4.17.4) converts with the 77 absent biases filled."""
    pytest.importorskip("torch")
    pytest.importorskip("addict")
    yt = pytest.importorskip("yolov6_torch")
    from flax import traverse_util

    try:
        model = yt.build("yolov6m_base")
    except ImportError as e:
        pytest.skip(str(e))
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    res = convert_state_dict(sd)
    assert (res.arch, res.form, res.dialect, res.filled) == ("yolov6m_base", "train", "yolov6", ())
    got, want = traverse_util.flatten_dict(res.variables), traverse_util.flatten_dict(yt.to_flax_variables(model))
    assert set(got) == set(want)
    for k in got:
        np.testing.assert_array_equal(got[k], np.asarray(want[k]), err_msg="/".join(k))
    v04 = {k: v.detach().numpy() for k, v in yt.to_v04(model).state_dict().items()}
    res = convert_state_dict(v04, "yolov6m_base")
    assert (res.arch, res.dialect, len(res.filled)) == ("yolov6m_base", "yolov6-0.4", 1 + 4 + 2 * (2 + 5 + 7 + 2 + 4 * 5))
