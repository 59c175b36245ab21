"""Data sources and preprocessing vs straightforward PIL + NumPy references."""

from __future__ import annotations

import sys
import types

import jax.numpy as jnp
import numpy as np

from cfws_jax.evaluate import evaluate_classifier
import pytest

PIL_Image = pytest.importorskip("PIL.Image")

from cfws_jax.data import (  # noqa: E402
    CIFAR10, IMAGENET, calibration_batches, calibration_indices, open_source, transform_pil,
)
from cfws_jax.data.preprocess import resize_short_size  # noqa: E402

CIFAR_FILE = "cifar10_jpeg_yoongikim.npz"


# ----------------------------------------------------------------------------- references

def ref_normalize(u8, mean, std):
    """float64 textbook normalization of uint8 RGB."""
    return (u8.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)


def ref_resize_crop(img, size=224):
    """Short side -> 256 (for 224), long side truncated, bilinear; then the centre crop."""
    short = int(size / 0.875)
    w, h = img.size
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    arr = np.asarray(img.convert("RGB").resize((nw, nh), PIL_Image.BILINEAR))
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    return arr[top:top + size, left:left + size]


def ref_direct(img, size=224):
    return np.asarray(img.convert("RGB").resize((size, size), PIL_Image.BILINEAR))


def random_image(rng, w, h, mode="RGB"):
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img = PIL_Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def make_folder(root, rng, layout):
    """layout: {class_name: [(file_name, (w, h), mode), ...]}; writes JPEG or PNG by suffix."""
    for cls, files in layout.items():
        d = root / cls
        d.mkdir(parents=True)
        for name, (w, h), mode in files:
            img = random_image(rng, w, h, mode)
            fmt = "PNG" if name.lower().endswith(".png") else "JPEG"
            img.save(d / name, format=fmt)


# ----------------------------------------------------------------------------- preprocessing

def test_normalization_constants_match_spec():
    assert IMAGENET.mean == (0.485, 0.456, 0.406) and IMAGENET.std == (0.229, 0.224, 0.225)
    assert CIFAR10.mean == (0.4914, 0.4822, 0.4465) and CIFAR10.std == (0.2470, 0.2435, 0.2616)
    assert resize_short_size((224, 224)) == 256


def test_normalize_vs_reference():
    u8 = np.random.default_rng(0).integers(0, 256, size=(2, 5, 4, 3), dtype=np.uint8)
    for norm in (IMAGENET, CIFAR10):
        got = norm(u8)
        assert got.dtype == np.float32 and got.shape == u8.shape
        np.testing.assert_allclose(got, ref_normalize(u8, norm.mean, norm.std), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="3 channels"):
        IMAGENET(u8[..., :2])


@pytest.mark.parametrize("wh", [(300, 200), (200, 301), (343, 500), (256, 256), (100, 80)])
def test_transform_pil_vs_reference(wh):
    img = random_image(np.random.default_rng(sum(wh)), *wh)
    got = transform_pil(img, 224, "resize_crop")
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref_resize_crop(img))
    got = transform_pil(img, (224, 224), "direct")
    np.testing.assert_array_equal(got, ref_direct(img))


def test_transform_matches_torchvision_eval_pipeline():
    transforms = pytest.importorskip("torchvision.transforms")
    pipe = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    rng = np.random.default_rng(3)
    for wh in [(300, 200), (200, 343), (500, 375), (224, 224)]:
        img = random_image(rng, *wh)
        np.testing.assert_array_equal(transform_pil(img, 224), np.asarray(pipe(img)))


def test_transform_converts_grayscale_and_rgba():
    rng = np.random.default_rng(1)
    for mode in ("L", "RGBA"):
        img = random_image(rng, 260, 240, mode)
        got = transform_pil(img, 224)
        np.testing.assert_array_equal(got, ref_resize_crop(img.convert("RGB")))


# ----------------------------------------------------------------------------- folder source

LAYOUT = {
    "n02": [("b.JPEG", (300, 240), "RGB"), ("a.png", (230, 260), "RGB")],
    "n01": [("z.jpg", (256, 300), "L"), ("y.Jpeg", (240, 240), "RGB"), ("x.PNG", (500, 230), "RGBA")],
    "n03": [("only.jpeg", (224, 224), "RGB")],
}


def test_folder_source_labels_order_and_values(tmp_path):
    rng = np.random.default_rng(0)
    make_folder(tmp_path / "val", rng, LAYOUT)
    (tmp_path / "val" / "n01" / "notes.txt").write_text("not an image")
    (tmp_path / "val" / ".hidden").mkdir()
    src = open_source(str(tmp_path), split="val", num_workers=2)
    assert src.class_names == ("n01", "n02", "n03")
    assert (src.num_images, src.num_classes, src.image_size) == (6, 3, (224, 224))
    # sorted classes -> labels, sorted file names inside each class
    expected = [("n01", "x.PNG"), ("n01", "y.Jpeg"), ("n01", "z.jpg"),
                ("n02", "a.png"), ("n02", "b.JPEG"), ("n03", "only.jpeg")]
    batches = list(src.iter_batches(4))
    assert [len(b[1]) for b in batches] == [4, 2]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    assert images.dtype == np.float32 and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 2])
    for i, (cls, name) in enumerate(expected):
        with PIL_Image.open(tmp_path / "val" / cls / name) as im:
            ref = ref_normalize(ref_resize_crop(im.convert("RGB")), IMAGENET.mean, IMAGENET.std)
        np.testing.assert_allclose(images[i], ref, atol=2e-6)
    # deterministic, threads or not, and limit
    serial = open_source(str(tmp_path / "val"), split="val", num_workers=0)
    x, y = next(serial.iter_batches(6, limit=3, subset="first"))
    np.testing.assert_array_equal(x, images[:3])
    np.testing.assert_array_equal(y, labels[:3])


def test_folder_source_direct_protocol_and_size(tmp_path):
    make_folder(tmp_path, np.random.default_rng(2), {"a": [("1.jpg", (90, 70), "RGB")],
                                                     "b": [("2.png", (40, 64), "RGB")]})
    src = open_source(str(tmp_path), image_size=32, protocol="direct", normalization="cifar10")
    assert src.image_size == (32, 32)
    x, y = src.load([1, 0])
    np.testing.assert_array_equal(y, [1, 0])
    with PIL_Image.open(tmp_path / "b" / "2.png") as im:
        ref = ref_normalize(ref_direct(im, 32), CIFAR10.mean, CIFAR10.std)
    np.testing.assert_allclose(x[0], ref, atol=2e-6)


def test_folder_split_folders(tmp_path):
    rng = np.random.default_rng(4)
    make_folder(tmp_path / "train", rng, {"c0": [("a.jpg", (30, 30), "RGB")],
                                          "c1": [("b.jpg", (30, 30), "RGB")]})
    make_folder(tmp_path / "validation", rng, {"c0": [("v.png", (30, 30), "RGB")]})
    assert open_source(str(tmp_path), split="train").num_images == 2
    assert open_source(str(tmp_path), split="val").num_images == 1  # "validation" accepted
    with pytest.raises(ValueError, match=r"no folder for split 'test'") as e:
        open_source(str(tmp_path), split="test")
    assert str(tmp_path) in str(e.value)


def test_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        open_source(str(missing))
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError) as e:
        open_source(str(empty))
    msg = str(e.value)
    assert str(empty) in msg and "*.jpg" in msg and "*.jpeg" in msg and "*.png" in msg
    flat = tmp_path / "flat"
    flat.mkdir()
    random_image(np.random.default_rng(0), 10, 10).save(flat / "a.jpg")
    unlabeled = open_source(str(flat))  # images without class folders: calibration only
    assert unlabeled.num_images == 1 and unlabeled.num_classes == 0
    assert unlabeled.load([0])[1].tolist() == [-1]
    with pytest.raises(ValueError, match="unlabeled"):
        evaluate_classifier(lambda x: jnp.zeros((x.shape[0], 3)), unlabeled, progress=False)
    with pytest.raises(ValueError, match=r"unknown split 'dev'") as e:
        open_source(str(empty), split="dev")
    assert str(empty) in str(e.value)
    with pytest.raises(ValueError, match="protocol"):
        open_source(str(flat.parent / "empty"), protocol="stretch")
    bad = tmp_path / "bad"
    (bad / "c").mkdir(parents=True)
    (bad / "c" / "broken.jpg").write_bytes(b"not a jpeg")
    src = open_source(str(bad))
    with pytest.raises(ValueError, match="broken.jpg"):
        src.load([0])
    with pytest.raises(ValueError, match="batch_size"):
        next(src.iter_batches(0))


# ----------------------------------------------------------------------------- npz source

def make_npz(path, n_train=40, n_test=20, hw=(8, 8), classes=True, num_classes=4):
    """Images carry their identity: pixel [0,0] = (index, split code, 7)."""
    rng = np.random.default_rng(0)

    def part(n, code):
        x = rng.integers(0, 256, size=(n,) + hw + (3,), dtype=np.uint8)
        x[:, 0, 0, 0] = np.arange(n)
        x[:, 0, 0, 1] = code
        y = np.sort(rng.integers(0, num_classes, size=n)).astype(np.int64)  # sorted by class
        return x, y

    xtr, ytr = part(n_train, 100)
    xte, yte = part(n_test, 200)
    arrays = dict(x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    if classes:
        arrays["classes"] = np.array([f"c{i}" for i in range(num_classes)])
    np.savez_compressed(path, **arrays)
    return arrays


def test_npz_source_native(tmp_path):
    path = tmp_path / "small.npz"
    arr = make_npz(path)
    src = open_source(str(path), split="test")
    assert (src.num_images, src.num_classes, src.image_size) == (20, 4, (8, 8))
    assert src.class_names == ("c0", "c1", "c2", "c3")
    batches = list(src.iter_batches(8))
    assert [len(b[1]) for b in batches] == [8, 8, 4]
    x = np.concatenate([b[0] for b in batches])
    np.testing.assert_allclose(x, ref_normalize(arr["x_test"], CIFAR10.mean, CIFAR10.std), atol=2e-6)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), arr["y_test"])
    # CIFAR has no validation split: "val" reads the test arrays
    xv, yv = open_source(str(path), split="val").load(np.arange(20))
    np.testing.assert_array_equal(xv, x)
    assert open_source(str(path), split="train").num_images == 40


def test_npz_source_resized_and_inferred_classes(tmp_path):
    path = tmp_path / "noclasses.npz"
    arr = make_npz(path, classes=False, num_classes=3)
    src = open_source(str(path), split="train", image_size=16, protocol="direct")
    assert src.image_size == (16, 16) and src.class_names is None
    assert src.num_classes == int(max(arr["y_train"].max(), arr["y_test"].max())) + 1
    x, _ = src.load([5])
    ref = ref_direct(PIL_Image.fromarray(arr["x_train"][5]), 16)
    np.testing.assert_allclose(x[0], ref_normalize(ref, CIFAR10.mean, CIFAR10.std), atol=2e-6)


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        open_source(str(tmp_path / "missing.npz"))
    path = tmp_path / "partial.npz"
    np.savez(path, x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.zeros(2, np.int64))
    with pytest.raises(ValueError) as e:
        open_source(str(path), split="test")
    assert "partial.npz" in str(e.value) and "x_test" in str(e.value) and "y_test" in str(e.value)
    bad = tmp_path / "floats.npz"
    np.savez(bad, x_test=np.zeros((2, 4, 4, 3), np.float32), y_test=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"floats.npz.*uint8"):
        open_source(str(bad), split="test")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        open_source(str(junk))
    with pytest.raises(ValueError, match=r"partial.npz.*unknown split"):
        open_source(str(path), split="validation")


# ----------------------------------------------------------------------------- calibration

def ids_of(batch, norm=CIFAR10):
    """Recover (split code, index) written into pixel [0,0] by make_npz."""
    u = np.rint((batch[:, 0, 0, :2] * np.array(norm.std[:2]) + np.array(norm.mean[:2])) * 255)
    return [(int(c), int(i)) for i, c in u.astype(int)]


def test_calibration_batches_seeded_disjoint_from_test(tmp_path):
    path = tmp_path / "small.npz"
    arr = make_npz(path)
    train = open_source(str(path), split="train")
    cal = calibration_batches(train, num_images=20, batch_size=8, seed=3)
    assert [b.shape for b in cal] == [(8, 8, 8, 3), (8, 8, 8, 3), (4, 8, 8, 3)]
    ids = [i for b in cal for i in ids_of(b)]
    assert all(code == 100 for code, _ in ids)  # all from train, none from test
    idx = [i for _, i in ids]
    assert len(set(idx)) == 20
    # the subset is the seeded permutation, not the class-sorted head of the array
    np.testing.assert_array_equal(idx, np.random.default_rng(3).permutation(40)[:20])
    assert len(set(arr["y_train"][idx].tolist())) > 1 and sorted(idx) != list(range(20))
    # images are exactly those training images
    np.testing.assert_allclose(np.concatenate(cal),
                               ref_normalize(arr["x_train"][idx], CIFAR10.mean, CIFAR10.std), atol=2e-6)
    again = calibration_batches(open_source(str(path), split="train"), num_images=20, batch_size=8, seed=3)
    for a, b in zip(cal, again):
        np.testing.assert_array_equal(a, b)
    other = calibration_batches(train, num_images=20, batch_size=8, seed=4)
    assert ids_of(other[0]) != ids_of(cal[0])
    with pytest.raises(ValueError, match=r"small.npz.*cannot draw 41"):
        calibration_batches(train, num_images=41)


def test_calibration_indices_reference():
    for n, k, seed in [(10, 10, 0), (1000, 32, 7)]:
        got = calibration_indices(n, k, seed)
        assert len(set(got.tolist())) == k and got.min() >= 0 and got.max() < n
        np.testing.assert_array_equal(got, calibration_indices(n, k, seed))


# ----------------------------------------------------------------------------- real CIFAR-10

def test_real_cifar_npz_test_split(shared_data):
    path = shared_data(CIFAR_FILE)
    src = open_source(str(path), split="test")
    assert (src.num_images, src.num_classes, src.image_size) == (10000, 10, (32, 32))
    assert src.class_names[0] == "airplane" and src.class_names[-1] == "truck"
    batches = list(src.iter_batches(128, limit=300, subset="first"))
    assert [len(b[1]) for b in batches] == [128, 128, 44]
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    with np.load(path) as z:
        raw = z["x_test"][:300]
    np.testing.assert_allclose(x, ref_normalize(raw, CIFAR10.mean, CIFAR10.std), atol=2e-6)
    assert (y == 0).all()  # sorted by class: the first 1000 test images are airplanes
    # a seeded subset spans classes even though the array is class-sorted
    cal = calibration_batches(src, num_images=64, batch_size=64, seed=0)
    assert cal[0].shape == (64, 32, 32, 3)
    idx = calibration_indices(10000, 64, 0)
    assert len(set((idx // 1000).tolist())) > 5


# ----------------------------------------------------------------------------- tfds

def test_tfds_missing_module_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="tensorflow_datasets"):
        open_source("tfds:cifar10")


def fake_tfds(images, labels, splits, num_classes=10, fixed_shape=(8, 8, 3)):
    """A stand-in exposing only what TfdsSource uses; records every load() call."""
    mod = types.ModuleType("tensorflow_datasets")
    mod.calls = []

    def parse(split):
        name, _, sl = split.partition("[")
        lo, hi = 0, splits.get(name, 0)
        if sl:
            a, b = sl.rstrip("]").split(":")
            lo, hi = int(a or 0), int(b or hi)
        return name, lo, hi

    class Builder:
        def __init__(self, name, data_dir=None):
            if name not in ("cifar10", "imagenet2012"):
                raise ValueError(f"dataset {name} not found")
            label = types.SimpleNamespace(num_classes=num_classes, names=[f"k{i}" for i in range(num_classes)])
            self.info = types.SimpleNamespace(
                splits={k: types.SimpleNamespace(num_examples=v) for k, v in splits.items()},
                features={"label": label, "image": types.SimpleNamespace(shape=fixed_shape)})

    def load(name, split, data_dir=None, download=True, shuffle_files=True):
        assert download is False and shuffle_files is False
        mod.calls.append(split)
        s, lo, hi = parse(split)
        return [{"image": images[s][i], "label": labels[s][i]} for i in range(lo, hi)]

    mod.builder, mod.load, mod.as_numpy = Builder, load, lambda ds: iter(ds)
    return mod


def test_tfds_source_with_fake_module(monkeypatch):
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8) for s, n in
              [("train", 12), ("test", 7)]}
    labels = {s: rng.integers(0, 10, size=len(v)) for s, v in images.items()}
    mod = fake_tfds(images, labels, {"train": 12, "test": 7})
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", mod)
    src = open_source("tfds:cifar10", split="val")  # no validation split -> test
    assert (src.num_images, src.num_classes, src.image_size) == (7, 10, (8, 8))
    assert src.normalization is CIFAR10
    got = list(src.iter_batches(3, limit=5, subset="first"))
    assert [len(b[1]) for b in got] == [3, 2] and mod.calls[-1] == "test[:5]"
    x = np.concatenate([b[0] for b in got])
    np.testing.assert_allclose(x, ref_normalize(images["test"][:5], CIFAR10.mean, CIFAR10.std), atol=2e-6)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in got]), labels["test"][:5])
    train = open_source("tfds:cifar10", split="train")
    xs, ys = train.load([9, 2, 3, 11])
    np.testing.assert_array_equal(ys, labels["train"][[9, 2, 3, 11]])
    np.testing.assert_allclose(xs, ref_normalize(images["train"][[9, 2, 3, 11]], CIFAR10.mean,
                                                 CIFAR10.std), atol=2e-6)
    assert mod.calls[-3:] == ["train[2:4]", "train[9:10]", "train[11:12]"]
    cal = calibration_batches(train, num_images=4, batch_size=4, seed=0)
    np.testing.assert_array_equal(cal[0], train.load(calibration_indices(12, 4, 0))[0])
    # variable-size datasets default to 224 and the ImageNet statistics
    mod_in = fake_tfds(images, labels, {"train": 12}, fixed_shape=(None, None, 3))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", mod_in)
    inet = open_source("tfds:imagenet2012", split="train")
    assert inet.image_size == (224, 224) and inet.normalization is IMAGENET
    with pytest.raises(ValueError, match=r"tfds:imagenet2012.*'validation'.*not prepared"):
        open_source("tfds:imagenet2012", split="val")  # no validation split prepared here... test neither
    with pytest.raises(ValueError, match="tfds:nosuch"):
        open_source("tfds:nosuch")


# ----------------------------------------------------------------------------- evaluation subsets

def ref_subset(labels, n):
    """Slow reference of the balanced rule: per-class quota by largest remainder, evenly spaced."""
    labels = list(labels)
    classes = sorted(set(labels))
    members = {c: [i for i, v in enumerate(labels) if v == c] for c in classes}
    quota = {c: n * len(members[c]) / len(labels) for c in classes}
    take = {c: int(quota[c]) for c in classes}
    for c in sorted(classes, key=lambda c: (-(quota[c] - take[c]), c))[:n - sum(take.values())]:
        take[c] += 1
    return sorted(members[c][int((j + 0.5) * len(members[c]) / take[c])] for c in classes for j in range(take[c]))


@pytest.mark.parametrize("seed", range(6))
def test_subset_indices_balanced_matches_reference(seed):
    from cfws_jax.data.source import subset_indices

    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, rng.integers(2, 12), size=int(rng.integers(20, 300))))  # sorted by class
    for n in (0, 1, 7, len(labels) // 3, len(labels) - 1, len(labels)):
        got = subset_indices(len(labels), n, labels, "balanced")
        assert got.tolist() == (ref_subset(labels, n) if n < len(labels) else list(range(n)))
        assert len(set(got.tolist())) == n
    np.testing.assert_array_equal(subset_indices(len(labels), 5, labels, "first"), np.arange(5))


def test_subset_sorted_cifar_like_source_is_balanced_and_described():
    from cfws_jax.data.npz import ArraySource
    from cfws_jax.data.source import describe_subset

    y = np.repeat(np.arange(10), 100)  # sorted by class, like the shared CIFAR-10 npz
    src = ArraySource(np.zeros((1000, 2, 2, 3), np.uint8), y, spec="mem", split="test", num_classes=10,
                      normalization=CIFAR10)
    labels = np.concatenate([b[1] for b in src.iter_batches(64, limit=100)])
    assert np.bincount(labels).tolist() == [10] * 10  # the first 100 would all be class 0
    assert np.concatenate([b[1] for b in src.iter_batches(64, limit=100, subset="first")]).tolist() == [0] * 100
    assert describe_subset(src.subset(100), 1000, y, "test images") == "100 of 1000 test images, 10 per class"
    assert describe_subset(src.subset(95), 1000, y) == "95 of 1000 images, 9-10 per class"
    assert describe_subset(src.subset(None), 1000, y) == "all 1000 images"
    assert describe_subset(src.subset(10, "first"), 1000, None) == "10 of 1000 images, the first ones"
    # without labels: evenly spaced over the whole source
    from cfws_jax.data.source import subset_indices

    np.testing.assert_array_equal(subset_indices(1000, 4, None), [125, 375, 625, 875])
    assert describe_subset([125, 375, 625, 875], 1000) == "4 of 1000 images, evenly spaced"
    with pytest.raises(ValueError, match="subset rule"):
        subset_indices(10, 3, None, "random")
