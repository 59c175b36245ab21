"""YOLOv6 checkpoint -> Flax conversion (converters/yolov6.py), against real PyTorch networks.

References (tests/yolov6_torch.py): the ``yolov6detect`` network (tag 0.3.0 code: v2.0 n/t/s,
v3.0 n/s, distilled v3.0 head), a v1.0 objectness head written from FORMATS.md §4.4, and 0.4.x
pickles emulated with classes named as upstream's. Every parameter and BN statistic is random and
fp16-exact; files are written like releases (engine dict, fp16 module). Decoded predictions of the
Flax train and deploy forms must match PyTorch eval mode (relative max abs difference <= 1e-3, and
identical NMS survivors on a fixed image).
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("addict")
pytest.importorskip("yaml")
if importlib.util.find_spec("yolov6") is None:
    pytest.skip("yolov6detect not installed (pip install --no-deps yolov6detect==0.4.1)", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import yolov6_torch as yt  # noqa: E402
from cfws_jax.models import create_model, fuse  # noqa: E402
from converters.convert import convert_state_dict  # noqa: E402
from converters.module_classes import YOLOV6_MODULE_CLASSES  # noqa: E402
from converters.torch_reader import read_state_dict  # noqa: E402

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")  # yolov6detect's anchors
HW = 128
DROPPED_PROJ = ("detect.proj", "detect.proj_conv.weight")


def image(hw: int = HW) -> np.ndarray:
    return yt.fixed_image(hw)


@functools.lru_cache(maxsize=None)
def case(name: str, distill: bool = False, num_classes: int = 80, hw: int = HW):
    """(torch model, its eval-mode prediction on :func:`image` ``(hw)``)."""
    model = yt.build(name, distill=distill, num_classes=num_classes)
    return model, yt.predict(model, image(hw))


@functools.lru_cache(maxsize=None)
def _apply_fn(arch: str, deploy: bool):
    return jax.jit(create_model(arch, deploy=deploy).apply)


def flax_predict(res_or_arch, variables=None, deploy=None, hw: int = HW) -> np.ndarray:
    if variables is None:
        res_or_arch, variables, deploy = res_or_arch.arch, res_or_arch.variables, res_or_arch.form == "deploy"
    return np.asarray(_apply_fn(res_or_arch, deploy)(variables, jnp.asarray(image(hw))))


def _nms():
    try:
        from cfws_jax.detection import nms
    except ImportError:
        return None
    return nms if callable(nms) else getattr(nms, "nms", None)


def assert_parity(pred: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert pred.shape == ref.shape, what
    scale = np.abs(ref).max()
    err = np.abs(pred - ref).max()
    assert scale > 0 and err <= 1e-3 * scale, f"{what}: max abs diff {err} vs output max abs {scale}"
    assert np.abs(pred[..., 4:] - ref[..., 4:]).max() <= 1e-3, f"{what}: scores differ"
    nms = _nms()
    if nms is not None:  # identical survivors of the official-settings NMS (as sets: near-tied
        a, b = _survivors(nms(pred[0])), _survivors(nms(ref[0]))  # scores may swap places)
        assert len(b[0]) > 10, what
        np.testing.assert_array_equal(a[0], b[0], err_msg=what)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-4, atol=1e-3 * scale, err_msg=what)


def _survivors(det):
    """(classes, boxes) of NMS survivors, sorted by class then box."""
    cls, boxes = np.asarray(det.classes), np.asarray(det.boxes, np.float64)
    order = np.lexsort((*boxes.T[::-1], cls))
    return cls[order], boxes[order]


def read(path):
    return read_state_dict(path, module_classes=YOLOV6_MODULE_CLASSES)


def torch_state_dict(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in _flat(v, prefix + (k,)).items()}
    return {prefix: np.asarray(tree)}


def assert_same_variables(a, b):
    fa, fb = _flat(a), _flat(b)
    assert set(fa) == set(fb)
    for k in fa:
        assert fa[k].dtype == np.float32 and np.array_equal(fa[k], fb[k]), k


# ----------------------------------------------------------------------------- parity matrix

def test_v2n_release_train_fused_and_deploy_state_dict(tmp_path):
    model, ref = case("yolov6n_v2")
    yt.save_release(model, tmp_path / "yolov6n.pt")
    src = read(tmp_path / "yolov6n.pt")
    assert src.container == "model" and src.file_format == "torch-zip"
    assert src.state_dict["backbone.stem.rbr_dense.conv.weight"].dtype == np.float16
    res = convert_state_dict(src.state_dict)
    assert (res.arch, res.form, res.dialect, res.num_classes) == ("yolov6n_v2", "train", "yolov6", None)
    assert res.dropped == DROPPED_PROJ
    assert set(res.variables) == {"params", "batch_stats"}
    k = res.variables["params"]["neck"]["upsample0"]["upsample_transpose"]["kernel"]
    assert k.shape == (1, 1, 64, 256) and k.dtype == np.float32
    assert_parity(flax_predict(res), ref, "v2 n train")
    assert_parity(flax_predict(res.arch, fuse(res.arch, res.variables), True), ref, "v2 n fused by cfws_jax")

    # plain state dicts: train (float32, DataParallel prefix) and upstream's deploy form
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "train_sd.pt")
    assert_same_variables(convert_state_dict(read(tmp_path / "train_sd.pt").state_dict).variables, res.variables)
    torch.save(yt.deploy(model).state_dict(), tmp_path / "deploy_sd.pt")
    dep = convert_state_dict(read(tmp_path / "deploy_sd.pt").state_dict, "yolov6n")
    assert (dep.arch, dep.form) == ("yolov6n_v2", "deploy") and set(dep.variables) == {"params"}
    assert_parity(flax_predict(dep), ref, "v2 n upstream deploy")


def test_v3n_engine_checkpoint_ema_and_deploy_state_dict(tmp_path):
    model, ref = case("yolov6n_v3")
    yt.save_release(model, tmp_path / "last_ckpt.pt", engine=True)  # ema + numpy float64 results
    src = read(tmp_path / "last_ckpt.pt")
    assert src.container == "ema"
    res = convert_state_dict(src.state_dict, "yolov6n_v3")
    assert (res.arch, res.form, res.dropped) == ("yolov6n_v3", "train", DROPPED_PROJ)
    assert "Bifusion1" in res.variables["params"]["neck"]
    assert_parity(flax_predict(res), ref, "v3 n train")
    torch.save(yt.deploy(model).state_dict(), tmp_path / "deploy_sd.pt")
    dep = convert_state_dict(read(tmp_path / "deploy_sd.pt").state_dict)
    assert (dep.arch, dep.form) == ("yolov6n_v3", "deploy")
    assert_parity(flax_predict(dep), ref, "v3 n upstream deploy")


def test_v3n_distilled_head_uses_reg_preds_lrtb(tmp_path):
    model, ref = case("yolov6n_v3", distill=True)
    assert tuple(model.detect.reg_preds[0].weight.shape)[0] == 68
    yt.save_release(model, tmp_path / "yolov6n.pt")
    res = convert_state_dict(read(tmp_path / "yolov6n.pt").state_dict, "yolov6n")
    assert res.arch == "yolov6n_v3"
    assert set(res.dropped) == set(DROPPED_PROJ) | {f"detect.reg_preds.{i}.{p}" for i in range(3)
                                                   for p in ("weight", "bias")}
    lrtb = model.detect.reg_preds_lrtb[1].weight.detach().numpy()
    np.testing.assert_array_equal(res.variables["params"]["detect"]["reg_preds_1"]["kernel"],
                                  lrtb.transpose(2, 3, 1, 0))
    assert_parity(flax_predict(res), ref, "v3 n distilled train")


def test_v3n_tag_0_4_pickle_is_normalised(tmp_path):
    model, ref = case("yolov6n_v3")
    np.testing.assert_array_equal(yt.predict(yt.to_v04(model), image()), ref)  # the emulation is faithful
    yt.save_release(model, tmp_path / "yolov6n_04.pt", engine=True, v04=True)
    with zipfile.ZipFile(tmp_path / "yolov6n_04.pt") as zf:
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    for name in (b"ConvModule", b"ConvBNReLU", b"ConvBNSiLU", b"CSPSPPFModule", b"numpy"):
        assert name in pkl
    sd = read(tmp_path / "yolov6n_04.pt").state_dict
    assert "backbone.ERBlock_5.2.cspsppf.cv1.block.conv.weight" in sd
    assert "neck.Bifusion0.cv3.block.bn.running_var" in sd
    res = convert_state_dict(sd)
    assert (res.arch, res.form, res.dialect) == ("yolov6n_v3", "train", "yolov6-0.4")
    assert_same_variables(res.variables, convert_state_dict(torch_state_dict(model)).variables)
    assert_parity(flax_predict(res), ref, "v3 n 0.4.x train")


def test_v1n_objectness_head_train_and_deploy(tmp_path):
    model, ref = case("yolov6n_v1")
    yt.save_release(model, tmp_path / "yolov6n_v1.pt")
    with zipfile.ZipFile(tmp_path / "yolov6n_v1.pt") as zf:
        assert b"effidehead" in zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    res = convert_state_dict(read(tmp_path / "yolov6n_v1.pt").state_dict)
    assert (res.arch, res.form, res.dropped) == ("yolov6n_v1", "train", ())
    assert res.variables["params"]["detect"]["obj_preds_2"]["kernel"].shape == (1, 1, 128, 1)
    assert_parity(flax_predict(res), ref, "v1 n train")
    torch.save(yt.deploy(model).state_dict(), tmp_path / "deploy_sd.pt")
    dep = convert_state_dict(read(tmp_path / "deploy_sd.pt").state_dict, "yolov6n_v1")
    assert dep.form == "deploy"
    assert_parity(flax_predict(dep), ref, "v1 n upstream deploy")


def test_v2s_release_train(tmp_path):
    model, ref = case("yolov6s_v2")
    yt.save_release(model, tmp_path / "yolov6s.pt")
    res = convert_state_dict(read(tmp_path / "yolov6s.pt").state_dict, "yolov6s")
    assert (res.arch, res.form) == ("yolov6s_v2", "train")
    assert_parity(flax_predict(res), ref, "v2 s train")


@pytest.mark.parametrize("name,upstream_deploy", [("yolov6t_v1", False), ("yolov6s_v1", False),
                                                  ("yolov6t_v2", True), ("yolov6s_v3", True)])
def test_other_variants_release_train_fused_and_deploy(tmp_path, name, upstream_deploy):
    """The remaining variants, at 64x64: release file -> train form and its cfws_jax fusion; for
    two of them also upstream's deploy state dict (the arch told by the keys and by the alias)."""
    model, ref = case(name, hw=64)
    yt.save_release(model, tmp_path / "release.pt")
    sd = read(tmp_path / "release.pt").state_dict
    res = convert_state_dict(sd)
    assert (res.arch, res.form) == (name, "train")
    assert convert_state_dict(sd, name.split("_")[0]).arch == name
    assert_parity(flax_predict(res, hw=64), ref, f"{name} train")
    assert_parity(flax_predict(name, fuse(name, res.variables), True, hw=64), ref, f"{name} fused by cfws_jax")
    if upstream_deploy:
        dep = convert_state_dict(torch_state_dict(yt.deploy(model)), name.split("_")[0])
        assert (dep.arch, dep.form) == (name, "deploy")
        assert_parity(flax_predict(dep, hw=64), ref, f"{name} upstream deploy")


# ----------------------------------------------------------------------------- errors

def _error(sd, arch=None, **kw) -> str:
    with pytest.raises(ValueError) as e:
        convert_state_dict(sd, arch, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_arch_hint_must_agree():
    sd = torch_state_dict(case("yolov6n_v2")[0])
    assert convert_state_dict(sd, "yolov6n").arch == "yolov6n_v2"
    assert convert_state_dict(sd, "yolov6n_v2").arch == "yolov6n_v2"
    msg = _error(sd, "yolov6s")
    assert "backbone.stem.rbr_dense.conv.weight" in msg and "(16, 3, 3, 3)" in msg and "(32, 3, 3, 3)" in msg
    assert "fit yolov6n_v2" in msg
    msg = _error(sd, "yolov6n_v3")
    assert "neck.Bifusion0" in msg and "fit yolov6n_v2" in msg
    msg = _error(sd, "yolov6n_v1")
    assert "detect.obj_preds" in msg and "fit yolov6n_v2" in msg
    assert "unknown YOLOv6 architecture 'yolov6x'" in _error(sd, "yolov6x")
    v3 = torch_state_dict(case("yolov6n_v3")[0])
    msg = _error(v3, "yolov6t")
    assert "yolov6t_v1, yolov6t_v2" in msg and "fit yolov6n_v3" in msg
    # t v1 (depth 0.25) vs s v1: same stem width, told apart by the ERBlock_3 block count
    msg = _error(torch_state_dict(yt.build("yolov6t_v1")), "yolov6s_v1")
    assert "backbone.ERBlock_3.1 has 3 RepVGG blocks" in msg and "fit yolov6t_v1" in msg


def test_bad_keys_are_listed_by_name():
    sd = torch_state_dict(case("yolov6n_v2")[0])
    gone = dict(sd)
    del gone["neck.Rep_p3.block.2.rbr_1x1.bn.running_var"]
    msg = _error(gone)
    assert "missing keys 1 (neck.Rep_p3.block.2.rbr_1x1.bn.running_var)" in msg
    extra = {**sd, "neck.extra.weight": np.zeros((4, 4, 1, 1), np.float32),
             "detect.cls_preds.1.weight": np.zeros((7, 64, 1, 1), np.float32)}
    msg = _error(extra)
    assert "unexpected keys 1 (neck.extra.weight)" in msg
    assert "shape mismatches 1 (detect.cls_preds.1.weight (7, 64, 1, 1) (expected (80, 64, 1, 1)))" in msg
    many = {k: v for k, v in sd.items() if not k.startswith("neck.Rep_n4.")}
    msg = _error(many)
    assert "missing keys" in msg and ", ..." in msg
    assert "num-classes 20 disagrees with detect.cls_preds.0.weight" in _error(sd, num_classes=20)
    assert "not a YOLOv6" in _error({k: v for k, v in sd.items() if not k.startswith("backbone.stem.")},
                                    "yolov6n")


def test_custom_num_classes():
    model, _ = case("yolov6n_v2", num_classes=20)
    res = convert_state_dict(torch_state_dict(model))
    assert (res.arch, res.num_classes) == ("yolov6n_v2", 20)
    assert res.variables["params"]["detect"]["cls_preds_0"]["kernel"].shape == (1, 1, 32, 20)


# ----------------------------------------------------------------------------- CLI, no yolov6 package

_BLOCKED = """
import sys
sys.modules["yolov6"] = None  # the reader must not need the yolov6 package
try:
    import yolov6.layers.common
except ImportError:
    pass
else:
    raise SystemExit("yolov6 is importable")
from cfws_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_converts_release_without_yolov6_package(tmp_path):
    from cfws_jax.io import load_variables

    model, _ = case("yolov6n_v2")
    ckpt = tmp_path / "yolov6n.pt"
    yt.save_release(model, ckpt)
    out = tmp_path / "yolov6n_flax"
    proc = subprocess.run([sys.executable, "-c", _BLOCKED, "convert", "--checkpoint", str(ckpt), "--out", str(out),
                           "--arch", "yolov6n"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "yolov6n_v2" in proc.stdout and "dropped     2 keys" in proc.stdout and "detect.proj" in proc.stdout
    variables, meta = load_variables(out)
    assert meta["arch"] == "yolov6n_v2" and meta["form"] == "train" and meta["container"] == "model"
    assert_same_variables(variables, convert_state_dict(torch_state_dict(model)).variables)

    proc = subprocess.run([sys.executable, "-c", _BLOCKED, "convert", "--checkpoint", str(ckpt), "--out",
                           str(tmp_path / "x"), "--arch", "yolov6s"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "--arch yolov6s disagrees" in proc.stderr and "fit yolov6n_v2" in proc.stderr


def test_cli_convert_deploy_fuses_release(tmp_path, capsys):
    """``cfws-jax convert --deploy`` on a release file writes fused deploy variables that match PyTorch."""
    from cfws_jax.cli import main
    from cfws_jax.io import load_variables

    model, ref = case("yolov6n_v2")
    ckpt = tmp_path / "yolov6n.pt"
    yt.save_release(model, ckpt)
    out = tmp_path / "yolov6n_deploy"
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out), "--arch", "yolov6n", "--deploy"]) == 0
    assert "form        deploy (fused from train form)" in capsys.readouterr().out
    variables, meta = load_variables(out)
    assert (meta["arch"], meta["form"], meta["fused_by_cfws_jax"]) == ("yolov6n_v2", "deploy", True)
    assert set(variables) == {"params"} and "rbr_reparam" in variables["params"]["backbone"]["stem"]
    assert_parity(flax_predict("yolov6n_v2", variables, True), ref, "v2 n cli --deploy")
