"""``cfws-jax convert``: PyTorch file -> orbax Flax variables, end to end through the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cfws_jax.cli import main
from cfws_jax.io import load_variables

torch = pytest.importorskip("torch")


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, prefix + (k,)))
        return out
    return {prefix: tree}


def test_help_lists_convert(capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--arch", "--checkpoint", "--out", "--deploy"):
        assert flag in out


def test_missing_and_unsafe_checkpoints_fail_cleanly(tmp_path, capsys):
    assert main(["convert", "--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o")]) == 1
    assert "nope.pth" in capsys.readouterr().err

    class Evil:
        def __reduce__(self):
            return (print, ("hello from the pickle",))

    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Evil()}, tmp_path / "evil.pth")
    assert main(["convert", "--checkpoint", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "refusing to load global 'builtins.print'" in captured.err
    assert "hello from the pickle" not in captured.out
    assert not (tmp_path / "o").exists()


def _random_train_state_dict(arch: str, dialect: str, seed: int = 0) -> dict:
    """Random PyTorch-named train-form weights for ``arch`` (BN variances positive)."""
    from converters.convert import key_table

    rng = np.random.default_rng(seed)
    sd = {}
    for key, (_, shape) in sorted(key_table(arch, "train", dialect).items()):
        if key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.endswith(".weight") and len(shape) == 4:
            value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))
        else:
            value = rng.standard_normal(shape) * 0.1
        sd[key] = torch.from_numpy(value.astype(np.float32))
    return sd


def test_train_form_convert_and_deploy(tmp_path, capsys):
    """Train-form file -> (a) train variables, exact; (b) --deploy: fused model == train model."""
    import jax.numpy as jnp

    from cfws_jax.models import create_model
    from converters.convert import convert_state_dict

    arch = "repvgg_cifar_small"
    sd = _random_train_state_dict(arch, "dingxiaoh")
    for k in list(sd):
        if k.endswith("running_var"):
            sd[k.replace("running_var", "num_batches_tracked")] = torch.tensor(3)
    ckpt = tmp_path / "train.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 9}, ckpt)

    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(tmp_path / "train")]) == 0
    out = capsys.readouterr().out
    assert arch in out and "train" in out and "model" in out and "module." in out
    variables, meta = load_variables(tmp_path / "train")
    assert meta["arch"] == arch and meta["form"] == "train" and meta["dialect"] == "dingxiaoh"
    assert meta["source_format"] == "torch-zip" and meta["container"] == "model"
    expected = convert_state_dict({k: v.numpy() for k, v in sd.items()}, arch).variables
    got, want = _flat(variables), _flat(expected)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == np.float32 and np.array_equal(got[k], np.asarray(want[k])), k
    n_params = sum(v.size for k, v in got.items() if k[0] == "params")
    assert f"{n_params:,}" in out

    assert main(["convert", "--arch", arch, "--checkpoint", str(ckpt), "--out", str(tmp_path / "dep"),
                 "--deploy"]) == 0
    out = capsys.readouterr().out
    assert "deploy" in out and "fused" in out
    fused, meta = load_variables(tmp_path / "dep")
    assert meta["form"] == "deploy" and meta["fused_by_cfws_jax"] is True
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)), jnp.float32)
    y_train = create_model(arch).apply(variables, x, train=False)
    y_dep = create_model(arch, deploy=True).apply(fused, x, train=False)
    np.testing.assert_allclose(np.asarray(y_dep), np.asarray(y_train), rtol=1e-4, atol=1e-4)

    # existing output: refused without --overwrite, replaced with it
    args = ["convert", "--checkpoint", str(ckpt), "--out", str(tmp_path / "dep")]
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert load_variables(tmp_path / "dep")[1]["form"] == "train"


def test_mobileone_s0_real_weights_golden_logits(tmp_path, shared_data, capsys):
    """Apple MobileOne-S0 (deploy form) saved with torch.save -> CLI -> Flax logits == golden."""
    import jax.numpy as jnp

    from cfws_jax.models import create_model

    npz = np.load(shared_data("mobileone_s0_deploy_awkrail.npz"))
    weights = {k: torch.from_numpy(npz[k]) for k in npz.files if not k.startswith("_ref_")}
    ckpt = tmp_path / "mobileone_s0.pth.tar"
    torch.save({"state_dict": weights}, ckpt)

    out_dir = tmp_path / "mobileone_s0"
    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out_dir), "--deploy"]) == 0
    out = capsys.readouterr().out
    assert "mobileone_s0" in out and "2,078,504" in out and "apple" in out
    variables, meta = load_variables(out_dir)
    assert meta["arch"] == "mobileone_s0" and meta["form"] == "deploy" and meta["fused_by_cfws_jax"] is False

    x = jnp.asarray(npz["_ref_input_apple_chw"].transpose(1, 2, 0)[None])  # CHW -> NHWC
    logits = np.asarray(create_model("mobileone_s0", deploy=True).apply(variables, x))[0]
    ref = npz["_ref_logits"]
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
    assert int(np.argmax(logits)) == int(np.argmax(ref)) == 957


def test_exclude_drops_named_extra_keys_explicitly(tmp_path, capsys):
    """Extra arrays are an error naming them, unless --exclude drops them (and lists them)."""
    sd = {k: v.numpy() for k, v in _random_train_state_dict("repvgg_cifar_small", "timm").items()}
    path = tmp_path / "weights.npz"
    np.savez(path, **sd, _ref_logits=np.zeros(10, np.float32))
    assert main(["convert", "--checkpoint", str(path), "--out", str(tmp_path / "a")]) == 1
    assert "_ref_logits" in capsys.readouterr().err
    assert main(["convert", "--checkpoint", str(path), "--out", str(tmp_path / "b"), "--exclude", "_ref_*"]) == 0
    assert "excluded    1 keys: _ref_logits" in capsys.readouterr().out
    assert main(["convert", "--checkpoint", str(path), "--out", str(tmp_path / "c"), "--exclude", "nomatch*"]) == 1
    assert "matched no key" in capsys.readouterr().err


def test_integer_weights_refused_unless_cast_integers(tmp_path, capsys):
    """An int64 weight is refused naming its key; --cast-integers converts it exactly to float32."""
    sd = _random_train_state_dict("repvgg_cifar_small", "dingxiaoh")
    key = next(k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 4)
    sd[key] = torch.round(sd[key] * 8).to(torch.int64)
    ckpt = tmp_path / "int.pth"
    torch.save(sd, ckpt)

    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert repr(key) in err and "int64" in err and "int.pth" in err
    assert not (tmp_path / "a").exists()

    assert main(["convert", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), "--cast-integers"]) == 0
    capsys.readouterr()
    from converters.convert import convert_state_dict

    want = convert_state_dict({k: v.numpy().astype(np.float32) for k, v in sd.items()}).variables
    got, want = _flat(load_variables(tmp_path / "b")[0]), _flat(want)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == np.float32 and np.array_equal(got[k], np.asarray(want[k])), k
