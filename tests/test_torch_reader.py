"""Safe checkpoint reader: torch.save zip + legacy round trips, safetensors, containers, safety."""

from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from converters.containers import CONTAINER_KEYS, module_state_dict, unwrap_state_dict
from converters.safetensors_reader import load_safetensors
from converters.torch_reader import (
    CheckpointError,
    detect_format,
    load_state_dict,
    load_torch_file,
    read_state_dict,
)

torch = pytest.importorskip("torch")

FORMATS = {"zip": True, "legacy": False}


def _save(obj, path, fmt="zip"):
    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return path


def _ref(t) -> np.ndarray:
    """Expected NumPy value of a torch tensor, computed by torch itself (bf16 -> exact float32)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.numpy().copy()


def _assert_same(got: np.ndarray, t) -> None:
    ref = _ref(t)
    assert isinstance(got, np.ndarray)
    assert got.shape == ref.shape
    if t.dtype == torch.bfloat16:
        assert got.dtype.name == "bfloat16"
        got = got.astype(np.float32)  # bf16 -> f32 is exact
    assert got.dtype == ref.dtype
    assert got.tobytes() == ref.tobytes()  # bit-exact, incl. NaN payloads and -0.0


def _tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    shared = torch.arange(30, dtype=torch.float32)
    special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-40])
    return {
        "f32": torch.randn(3, 2, 3, 3, generator=g),
        "f16": torch.randn(5, 7, generator=g).half(),
        "bf16": torch.randn(4, 3, generator=g).bfloat16(),
        "f64": torch.randn(3, generator=g).double(),
        "i64": torch.tensor([0, -1, 2**40, -(2**62)]),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "special": special,
        "base": base,
        "transposed": base.t(),                   # non-contiguous view of base (shared storage)
        "offset_slice": base[1:, 2:5],            # storage offset + strides
        "strided": base[::2, ::3],
        "flat_shared_a": shared[3:13].view(2, 5),  # two tensors, one storage, different offsets
        "flat_shared_b": shared[10:],
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
        "num_batches_tracked": torch.tensor(17),
    }


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_round_trip_matches_torch(tmp_path, fmt):
    tensors = _tensors()
    path = _save(tensors, tmp_path / f"t_{fmt}.pt", fmt)
    assert detect_format(path) == f"torch-{fmt}"
    got = load_torch_file(path)
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        _assert_same(got[k], t)
    assert got["transposed"].flags.c_contiguous


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_nested_objects_and_plain_values(tmp_path, fmt):
    obj = {
        "epoch": 3, "name": "x", "acc": 71.5, "none": None, "flags": {1, 2}, "pair": (1, "a"),
        "list": [torch.ones(2), {"deep": torch.arange(3)}],
        "size": torch.Size([2, 3]),
        "od": collections.OrderedDict(a=torch.zeros(1)),
        "np_scalar": np.float64(0.25),
    }
    got = load_torch_file(_save(obj, tmp_path / "n.pt", fmt))
    assert got["epoch"] == 3 and got["name"] == "x" and got["acc"] == 71.5 and got["none"] is None
    assert got["flags"] == {1, 2} and got["pair"] == (1, "a") and got["size"] == (2, 3)
    assert isinstance(got["od"], collections.OrderedDict)
    _assert_same(got["list"][0], obj["list"][0])
    _assert_same(got["list"][1]["deep"], obj["list"][1]["deep"])
    assert got["np_scalar"] == np.float64(0.25) and got["np_scalar"].dtype == np.float64


def test_reader_does_not_need_torch(tmp_path):
    tensors = {"w": torch.randn(3, 4).t(), "h": torch.randn(2).bfloat16()}
    path = _save(tensors, tmp_path / "w.pt")
    _save(tensors, tmp_path / "w_legacy.pt", "legacy")
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any 'import torch' now raises ImportError
        "from converters.torch_reader import load_torch_file\n"
        f"for p in ({str(path)!r}, {str(tmp_path / 'w_legacy.pt')!r}):\n"
        "    d = load_torch_file(p)\n"
        "    print(d['w'].shape, d['h'].dtype)\n"
        "print('torch' in sys.modules and sys.modules['torch'] is not None)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["(4, 3) bfloat16", "(4, 3) bfloat16", "False"]


def test_safetensors_round_trip(tmp_path):
    st_torch = pytest.importorskip("safetensors.torch")
    tensors = {k: v.detach().clone().contiguous() for k, v in _tensors().items()}
    path = tmp_path / "m.safetensors"
    st_torch.save_file(tensors, str(path), metadata={"format": "pt"})
    assert detect_format(path) == "safetensors"
    got, meta = load_safetensors(path, with_metadata=True)
    assert meta == {"format": "pt"}
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        _assert_same(got[k], t)
    with pytest.raises(CheckpointError, match=r"key 'i64' holds int64"):  # integers refused by default
        load_state_dict(path)
    floats = {k: v for k, v in tensors.items()
              if (v.is_floating_point() and k != "special") or k == "num_batches_tracked"}
    st_torch.save_file(floats, str(path))
    sd = load_state_dict(path)  # unwrapped: num_batches_tracked ignored
    assert "num_batches_tracked" not in sd and set(sd) == set(floats) - {"num_batches_tracked"}


def test_npz_state_dict(tmp_path):
    arrays = {"conv.weight": np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3), "conv.bias": np.ones(1)}
    np.savez(tmp_path / "w.npz", **arrays)
    src = read_state_dict(tmp_path / "w.npz")
    assert src.file_format == "npz" and src.container is None
    for k, v in arrays.items():
        np.testing.assert_array_equal(src.state_dict[k], v)


# ----------------------------------------------------------------------------- containers

def _sd():
    return collections.OrderedDict(
        [("conv.weight", torch.randn(2, 1, 3, 3)), ("bn.running_mean", torch.randn(2)),
         ("bn.num_batches_tracked", torch.tensor(5))])


@pytest.mark.parametrize("wrap,container", [
    (lambda sd: sd, None),
    (lambda sd: {"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, "state_dict"),
    (lambda sd: {"model": sd, "arch": "a"}, "model"),
    (lambda sd: {"ema": sd, "model": None}, "ema"),
    (lambda sd: {"model": {"x": torch.zeros(1)}, "ema": sd}, "ema"),        # ema beats model
    (lambda sd: {"model": {"x": torch.zeros(1)}, "state_dict": sd, "ema": None}, "state_dict"),
    (lambda sd: {"model": {"state_dict": sd, "step": 1}}, "model/state_dict"),
])
def test_container_unwrapping(tmp_path, wrap, container):
    sd = _sd()
    src = read_state_dict(_save(wrap(sd), tmp_path / "c.pt"))
    assert src.container == container
    assert src.ignored == ("bn.num_batches_tracked",)
    assert list(src.state_dict) == ["conv.weight", "bn.running_mean"]
    for k in src.state_dict:
        _assert_same(src.state_dict[k], sd[k])


def test_container_precedence_is_documented_order():
    assert CONTAINER_KEYS == ("ema", "state_dict", "model")


def test_module_prefix_and_explicit_key(tmp_path):
    sd = {"module." + k: v for k, v in _sd().items()}
    path = _save({"model": sd, "ema": {"other.w": torch.ones(1)}}, tmp_path / "dp.pt")
    src = read_state_dict(path, container_key="model")
    assert src.container == "model" and src.stripped_prefix == "module."
    assert list(src.state_dict) == ["conv.weight", "bn.running_mean"]
    assert src.ignored == ("module.bn.num_batches_tracked",)
    assert list(load_state_dict(path)) == ["other.w"]  # default precedence: ema
    # a prefix on only some keys is a real module name: kept
    un = unwrap_state_dict({"module.a": np.zeros(1), "b": np.zeros(1)})
    assert un.stripped_prefix is None and list(un.state_dict) == ["module.a", "b"]


@pytest.mark.parametrize("obj,match", [
    ({"conv.weight": np.zeros(1), "extra": "text"}, r"'extra' holds a str"),
    ({"epoch": 1, "optimizer": {}}, r"none of the container keys"),
    ({"model": None, "ema": None}, r"none of the container keys"),
    ({}, r"empty"),
    ({"num_batches_tracked": np.zeros(())}, r"only num_batches_tracked"),
    ([np.zeros(1)], r"got list"),
])
def test_container_errors(obj, match):
    with pytest.raises(ValueError, match=match):
        unwrap_state_dict(obj)
    with pytest.raises(ValueError, match="not found"):
        unwrap_state_dict({"a": np.zeros(1)}, container_key="ema")


def test_pickled_module_refused_unless_stubbed(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU())
    model.register_buffer("scratch", torch.ones(1), persistent=False)
    for fmt in FORMATS:
        path = _save({"model": model, "ema": None}, tmp_path / f"m_{fmt}.pt", fmt)
        with pytest.raises(CheckpointError, match=r"torch\.nn\.modules\.container\.Sequential"):
            load_torch_file(path)
        obj = load_torch_file(path, stub_globals=("torch.nn.modules.",))
        ref = model.state_dict()
        got = module_state_dict(obj["model"])
        assert list(got) == list(ref)  # non-persistent buffer skipped, order kept
        for k, t in ref.items():
            _assert_same(got[k], t)
        src = read_state_dict(path, stub_globals=("torch.nn.modules.",))
        assert src.container == "model" and src.ignored == ("1.num_batches_tracked",)


# ----------------------------------------------------------------------------- safety

class _Payload:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvalPayload:
    def __reduce__(self):
        return (eval, ("1+1",))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle"])
def test_code_executing_payload_is_refused(tmp_path, fmt):
    marker = tmp_path / "pwned"
    obj = {"state_dict": {"w": torch.ones(2)}, "evil": _Payload(f"touch {marker}")}
    path = tmp_path / f"evil_{fmt}.pt"
    if fmt == "pickle":  # a bare pickle (no torch framing, so no tensors either)
        obj["state_dict"] = {"w": [1.0, 2.0]}
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
    else:
        _save(obj, path, fmt)
    for loader in (load_torch_file, load_state_dict):
        with pytest.raises(CheckpointError, match=r"refusing to load global '(posix|nt|os)\.system'") as e:
            loader(path)
        assert str(path) in str(e.value)
    assert not marker.exists()


def test_other_refused_globals(tmp_path):
    path = _save({"x": _EvalPayload()}, tmp_path / "eval.pt")
    with pytest.raises(CheckpointError, match=r"'builtins\.eval'"):
        load_torch_file(path)
    # the stub mechanism only covers the prefixes asked for
    with pytest.raises(CheckpointError, match=r"'builtins\.eval'"):
        load_torch_file(path, stub_globals=("torch.nn.",))


def test_stubs_never_execute(tmp_path):
    marker = tmp_path / "pwned"
    path = _save({"evil": _Payload(f"touch {marker}")}, tmp_path / "e.pt")
    obj = load_torch_file(path, stub_globals=("posix.", "nt.", "os."))
    assert obj["evil"].args == (f"touch {marker}",)
    assert not marker.exists()


def _zip_with_data_pkl(path, data: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/version", "3\n")
    return path


def test_hand_made_zip_payload(tmp_path):
    marker = tmp_path / "pwned"
    path = _zip_with_data_pkl(tmp_path / "h.pt", pickle.dumps({"a": _Payload(f"touch {marker}")}, protocol=4))
    with pytest.raises(CheckpointError, match=r"system"):
        load_torch_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_truncated_files_raise_clear_errors(tmp_path, fmt):
    full = _save(_tensors(), tmp_path / f"full_{fmt}.pt", fmt).read_bytes()
    for frac in (0.1, 0.5, 0.9, 0.999):
        path = tmp_path / f"cut_{fmt}_{frac}.pt"
        path.write_bytes(full[: int(len(full) * frac)])
        with pytest.raises(CheckpointError) as e:
            load_state_dict(path)
        assert str(path) in str(e.value)


def test_corrupted_files_raise_clear_errors(tmp_path):
    full = bytearray(_save(_tensors(), tmp_path / "full.pt").read_bytes())
    i = full.find(b"data.pkl") + 200  # inside the pickle member's payload
    full[i:i + 8] = b"\xff" * 8
    st_header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'
    cases = {
        "flipped.pt": bytes(full),
        "garbage.pt": b"this is not a checkpoint at all" * 10,
        "empty.pt": b"",
        "badpickle.pt": b"\x80\x02}q\x00(X\x01\x00\x00\x00a\x93",  # protocol-2 pickle, cut short
        "st_cut.safetensors": len(st_header).to_bytes(8, "little") + st_header + b"\0" * 8,  # 16 needed
        "st_badjson.safetensors": len(st_header).to_bytes(8, "little") + st_header[:-3] + b"!!!" + b"\0" * 16,
        "st_badlen.safetensors": (2**40).to_bytes(8, "little") + st_header + b"\0" * 16,
        "st_dtype.safetensors": len(st_header).to_bytes(8, "little") + st_header.replace(b"F32", b"X32")
                                + b"\0" * 16,
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            load_state_dict(path)
        assert str(path) in str(e.value), name
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_state_dict(tmp_path / "missing.pt")


def test_missing_storage_record(tmp_path):
    src = _save({"w": torch.ones(3)}, tmp_path / "ok.pt")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp_path / "nostore.pt", "w") as zout:
        for n in zin.namelist():
            if "/data/" not in n:
                zout.writestr(n, zin.read(n))
    with pytest.raises(CheckpointError, match=r"missing storage record"):
        load_torch_file(tmp_path / "nostore.pt")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive_is_named(tmp_path):
    scripted = torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2))
    path = tmp_path / "ts.pt"
    torch.jit.save(scripted, str(path))
    with pytest.raises(CheckpointError, match=r"TorchScript"):
        load_torch_file(path)


@pytest.mark.parametrize("state", [
    b"N}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86",  # (None, {...}): setattr path
    b"}X\x0c\x00\x00\x00__defaults__K\x01\x85s",        # {...}: __dict__ path
])
def test_build_cannot_modify_allow_listed_functions(tmp_path, state):
    data = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + state + b"b."
    path = _zip_with_data_pkl(tmp_path / "b.pt", data)
    with pytest.raises(CheckpointError, match=str(path)):
        load_torch_file(path)
    ok = load_torch_file(_save({"w": torch.arange(4.0)}, tmp_path / "ok.pt"))  # still works
    np.testing.assert_array_equal(ok["w"], np.arange(4.0, dtype=np.float32))


# ----------------------------------------------------------------------------- module_classes

def test_module_classes_exact_names(tmp_path):
    from converters.module_classes import TORCH_NN_MODULE_CLASSES
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU())
    for fmt in FORMATS:
        path = _save({"model": model, "ema": None}, tmp_path / f"m_{fmt}.pt", fmt)
        src = read_state_dict(path, module_classes=TORCH_NN_MODULE_CLASSES)
        assert src.container == "model" and list(src.state_dict) == [
            k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
        for k, v in src.state_dict.items():
            _assert_same(v, model.state_dict()[k])
        with pytest.raises(CheckpointError, match=r"torch\.nn\.modules\.container\.Sequential"):
            load_torch_file(path, module_classes={"torch.nn.modules.conv.Conv2d"})


def test_yolov6_style_pickled_model(tmp_path, monkeypatch):
    """Release-form file: fp16 module tree of yolov6.* classes, read with YOLOV6_MODULE_CLASSES."""
    import types

    from converters.module_classes import YOLOV6_MODULE_CLASSES
    nn = torch.nn
    mods = {}
    for name in ("yolov6", "yolov6.models", "yolov6.models.yolo", "yolov6.layers", "yolov6.layers.common"):
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])

    class RepVGGBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.rbr_dense = nn.Sequential()
            self.rbr_dense.add_module("conv", nn.Conv2d(3, 4, 3, bias=False))
            self.rbr_dense.add_module("bn", nn.BatchNorm2d(4, eps=1e-3))
            self.nonlinearity = nn.ReLU()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.ModuleList([RepVGGBlock()])
            self.stride = torch.tensor([8.0, 16.0, 32.0])  # plain attribute, not a buffer

    for cls, mod in ((RepVGGBlock, "yolov6.layers.common"), (Model, "yolov6.models.yolo")):
        cls.__module__, cls.__qualname__ = mod, cls.__name__
        setattr(mods[mod], cls.__name__, cls)
    model = Model().half()
    path = _save({"model": model, "ema": None, "epoch": 299, "results": np.float64(0.5)}, tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match=r"yolov6\.models\.yolo\.Model"):
        read_state_dict(path)
    src = read_state_dict(path, module_classes=YOLOV6_MODULE_CLASSES)
    ref = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert src.container == "model" and list(src.state_dict) == list(ref)
    for k, v in ref.items():
        _assert_same(src.state_dict[k], v)
    obj = load_torch_file(path, module_classes=YOLOV6_MODULE_CLASSES)
    block = obj["model"]._modules["backbone"]._modules["0"]
    assert block._modules["rbr_dense"]._modules["bn"].eps == 1e-3
    assert type(block).pickled_global == "yolov6.layers.common.RepVGGBlock"


def test_module_record_with_bad_state(tmp_path):
    data = (b"\x80\x02ctorch.nn.modules.conv\nConv2d\n)\x81}(X\x0b\x00\x00\x00_parametersK\x01"
            b"X\x08\x00\x00\x00_modules}ub.")
    path = _zip_with_data_pkl(tmp_path / "bad.pt", data)
    with pytest.raises(CheckpointError, match=r"_parameters is a int"):
        read_state_dict(path, module_classes={"torch.nn.modules.conv.Conv2d"})
