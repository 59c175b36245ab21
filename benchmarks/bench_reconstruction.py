"""Issue #14: what bias correction and learned rounding add on top of CFWS + KL.

Two parts, each printing Markdown tables (paste them into the README with the machine lines):

``cifar``  The shipped CIFAR-10 RepVGG-A0 at each bit setting, every method on the same
           calibration sample per seed (``--num-calib`` training images drawn with the seed; the
           seed also seeds the reconstruction's minibatches), top-1 on the test split: mean ±
           std over the seeds, the drop against float, and the seconds of the refinement.

``s0``     Apple's MobileOne-S0 ImageNet weights (``--s0``, the shared deploy npz): the
           logits of ``cfws_kl``, ``cfws_kl_bc`` and ``cfws_kl_recon`` against the float
           logits on images *not* used for calibration (mean per-image cosine, SQNR over all
           logits, top-1 agreement), plus the reconstruction's time per layer and in total and
           the process's peak memory. No ImageNet labels exist here, so COCO128 images stand in
           as unlabeled images: the first ``--s0-calib-images`` (sorted by name) give four views
           each (centre crop, its mirror, the squashed whole image, its mirror) as the
           calibration set, the rest (one centre crop each) and the golden input are held out.

    python benchmarks/bench_reconstruction.py cifar --data ../shared/data/cifar10_jpeg_yoongikim.npz \
        [--seeds 0 1 2] [--settings 8,8 6,6 4,8 4,4] [--num-calib 256] [--iters N] [--every 1]
    python benchmarks/bench_reconstruction.py s0 --s0 ../shared/data/mobileone_s0_deploy_awkrail.npz \
        --coco ../shared/data/coco128/train2017 [--s0-calib-images 64] [--iters N] [--settings 8,8 6,6 4,8] \
        [--methods cfws_kl cfws_kl_cle] [--ranges stage3_16 stage3_17 stage3_18] [--absorption]

``--iters`` defaults to :class:`cfws_jax.ptq.QuantConfig`'s ``recon_iters``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import load_line, print_machine  # noqa: E402

CIFAR_METHODS = ("minmax", "cfws_kl", "cfws_kl_bc", "cfws_kl_recon", "kl_recon")
S0_METHODS = ("cfws_kl", "cfws_kl_bc", "cfws_kl_recon")  # also cfws_kl_cle, cfws_kl_u, cfws_kl_recon_u (#24)


def peak_rss_gb() -> float:
    """The process's peak resident memory (``VmHWM``, Linux) in GB; NaN elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return float("nan")


def _value(v: str):
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def method_config(name: str, num_calib: int, iters: int | None, w: int, a: int, seed: int):
    """A preset, or ``PRESET@field=value,...`` with QuantConfig fields replaced
    (``cfws_kl_recon@recon_unit=layer``, ``cfws_kl_recon@recon_act_step=true``)."""
    from cfws_jax.ptq import get_preset

    preset, _, fields = name.partition("@")
    extra = dict(kv.split("=", 1) for kv in fields.split(",")) if fields else {}
    cfg = get_preset(preset, **{k: _value(v) for k, v in extra.items()})
    cfg = cfg.replace(num_calib_images=num_calib, w_bits=w, a_bits=a, seed=seed)
    return cfg if iters is None or not cfg.reconstruct else cfg.replace(recon_iters=iters)


def loss_ratio(qm) -> str:
    """``", layer loss after / before: median M (min..max)"`` of a reconstructed model, else ``""``."""
    rec = qm.meta.get("reconstruction")
    if not rec:
        return ""
    r = np.array([v["loss_after"] / v["loss_before"] for v in rec.values() if v["loss_before"] > 0])
    return f", layer loss after / before: median {np.median(r):.3f} ({r.min():.3f}..{r.max():.3f})"


def refine_seconds(qm) -> float:
    return float(qm.meta.get("refine_seconds", 0.0))


# ----------------------------------------------------------------------------------------------
# CIFAR-10 RepVGG-A0


class EveryKth:
    """Every ``k``-th image of an image source (the CIFAR test split is sorted by class, so this
    keeps the classes balanced; the same images as before the class-balanced ``--limit``)."""

    def __init__(self, base, k: int):
        self.base, self.k = base, k
        self.spec, self.split, self.num_classes = base.spec, base.split, base.num_classes
        self.num_images = -(-base.num_images // k)

    def count(self, limit=None) -> int:
        return self.num_images if limit is None else min(limit, self.num_images)

    def known_labels(self):
        labels = self.base.known_labels()
        return None if labels is None else labels[::self.k]

    def subset(self, limit=None, subset: str = "balanced"):
        del subset  # the first ``limit`` of the every-k-th images (all of them in this benchmark)
        return np.arange(self.count(limit))

    def iter_batches(self, batch_size: int, limit=None, subset: str = "balanced"):
        idx = self.subset(limit, subset)
        for start in range(0, len(idx), batch_size):
            yield self.base.load(idx[start:start + batch_size] * self.k)


def run_cifar(args) -> None:
    import dataclasses

    from cfws_jax.demo import ShippedExperiment
    from cfws_jax.ptq import quantize, quantized_apply_fn

    settings = [tuple(int(v) for v in s.split(",")) for s in args.settings]
    exp = ShippedExperiment.load(args.data, None)
    if args.every > 1:
        sub = EveryKth(exp.test, args.every)
        exp = dataclasses.replace(exp, test=sub, limit=sub.num_images)
    float_top1 = 100 * exp.float_top1()
    iters = args.iters
    print(f"{exp.arch} (shipped), {exp.limit} CIFAR-10 test images (every {args.every}), {args.num_calib} "
          f"calibration train images "
          f"per seed, seeds {args.seeds}, reconstruction iterations "
          f"{iters if iters is not None else 'default'}; float top-1 {float_top1:.2f}%\n", flush=True)
    calib = {s: exp.calibration(args.num_calib, s) for s in args.seeds}
    rows = []
    for w, a in settings:
        for name in args.methods:
            accs, secs = [], []
            for s in args.seeds:
                cfg = method_config(name, args.num_calib, iters, w, a, s)
                t = time.perf_counter()
                qm = quantize(exp.arch, exp.variables, calib[s], cfg, progress=False)
                tq = time.perf_counter() - t
                accs.append(100 * exp._top1(quantized_apply_fn(qm, exp.model)))
                secs.append(refine_seconds(qm))
                print(f"  W{w}A{a} {name} seed {s}: top-1 {accs[-1]:.2f}%, quantize {tq:.1f} s "
                      f"(refine {secs[-1]:.1f} s){loss_ratio(qm)}, {load_line()}", flush=True)
            rows.append((f"W{w}A{a}", name, np.array(accs), float(np.mean(secs))))
    print("\n| setting | method | top-1 (%) mean ± std | vs float (pts) | seeds | refine s (mean) |")
    print("|---|---|---|---|---|---|")
    for setting, name, acc, sec in rows:
        print(f"| {setting} | {name} | {acc.mean():.2f} ± {acc.std():.2f} | {acc.mean() - float_top1:+.2f} | "
              f"{' / '.join(f'{v:.2f}' for v in acc)} | {sec:.0f} |")
    print(f"\nfloat top-1 {float_top1:.2f}%; peak memory {peak_rss_gb():.2f} GB", flush=True)


# ----------------------------------------------------------------------------------------------
# MobileOne-S0 on unlabeled images


def _s0_images(coco: Path, n_calib: int):
    """``(calibration [4 n_calib, 224, 224, 3], held-out [M, 224, 224, 3])`` float32 NHWC, ImageNet-normalized."""
    from cfws_jax.data.preprocess import get_normalization, load_image, transform_pil

    norm = get_normalization("imagenet")
    files = sorted(coco.glob("*.jpg"))
    if len(files) <= n_calib:
        raise SystemExit(f"{coco}: {len(files)} images, need more than --s0-calib-images {n_calib}")
    calib, held = [], []
    for f in files[:n_calib]:
        img = load_image(f)
        for protocol in ("resize_crop", "direct"):
            view = transform_pil(img, (224, 224), protocol)
            calib += [view, view[:, ::-1]]
    for f in files[n_calib:]:
        held.append(transform_pil(load_image(f), (224, 224)))
    return norm(np.stack(calib)), norm(np.stack(held))


def _logit_stats(ref, test) -> dict:
    from cfws_jax.ptq.report import sqnr_db

    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    cos = np.sum(ref * test, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(test, axis=1))
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "sqnr": sqnr_db(ref, test),
            "agree": float(np.mean(ref.argmax(1) == test.argmax(1)))}


def run_s0(args) -> None:
    import jax

    from converters.convert import convert_state_dict
    from cfws_jax.models import create_model
    from cfws_jax.ptq import quantize, quantized_apply_fn

    npz = np.load(args.s0)
    variables = convert_state_dict({k: npz[k] for k in npz.files if not k.startswith("_ref_")},
                                   "mobileone_s0").variables
    calib, held = _s0_images(Path(args.coco), args.s0_calib_images)
    golden = npz["_ref_input_apple_chw"].transpose(1, 2, 0)[None].astype(np.float32)
    model = create_model("mobileone_s0", deploy=True)
    float_fn = jax.jit(lambda x: model.apply(variables, x))

    def logits(fn, x):
        return np.concatenate([np.asarray(fn(x[i:i + 32])) for i in range(0, len(x), 32)])

    ref_held, ref_golden = logits(float_fn, held), np.asarray(npz["_ref_logits"])[None]
    batches = [calib[i:i + 32] for i in range(0, len(calib), 32)]
    print(f"mobileone_s0 (Apple ImageNet weights), calibration {len(calib)} views of {args.s0_calib_images} "
          f"COCO128 images, held out {len(held)} COCO128 images + the golden input, seed {args.seed}, "
          f"reconstruction iterations {args.iters if args.iters is not None else 'default'}\n", flush=True)
    if args.ranges:
        s0_ranges(model, variables, calib[:32], args.ranges)
    if args.absorption:
        s0_absorption(model, variables, calib)
    results = {}
    for w, a in [tuple(int(v) for v in st.split(",")) for st in args.settings]:
        for name in args.methods:
            cfg = method_config(name, len(calib), args.iters, w, a, args.seed)
            t = time.perf_counter()
            qm = quantize("mobileone_s0", variables, batches, cfg, progress=not args.no_progress)
            tq = time.perf_counter() - t
            fn = quantized_apply_fn(qm, model)
            key = name if args.settings == ["8,8"] else f"W{w}A{a} {name}"
            results[key] = (_logit_stats(ref_held, logits(fn, held)), _logit_stats(ref_golden, logits(fn, golden)),
                            tq, qm.meta)
            h = results[key][0]
            print(f"  {key}: quantize {tq:.0f} s, held-out cosine {h['cosine']:.4f} SQNR {h['sqnr']:.2f} dB, "
                  f"peak memory so far {peak_rss_gb():.2f} GB, {load_line()}", flush=True)
    if not results:
        return
    head = "method (W8A8)" if args.settings == ["8,8"] else "setting, method"
    print(f"\n| {head} | held-out cosine mean (min) | held-out SQNR dB | top-1 agreement | golden cosine | "
          "golden SQNR dB | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for name, (h, g, tq, _) in results.items():
        print(f"| {name} | {h['cosine']:.4f} ({h['cosine_min']:.4f}) | {h['sqnr']:.2f} | {h['agree']:.3f} | "
              f"{g['cosine']:.4f} | {g['sqnr']:.2f} | {tq:.0f} |")
    for name, (_, _, tq, meta) in results.items():
        rec = meta.get("reconstruction")
        if not rec:
            continue
        learn = sum(v["seconds"] for v in rec.values())
        cap = sum(v["capture_seconds"] for v in rec.values())
        print(f"\n{name}: {len(rec)} layers reconstructed; learning {learn:.0f} s, captures and targets {cap:.0f} s, "
              f"whole refinement {meta['refine_seconds']:.0f} s ({meta['refine_seconds'] / 60:.1f} min); "
              f"quantize {tq:.0f} s in all; process peak memory {peak_rss_gb():.2f} GB")
        print("slowest layers (learning s, capture s, loss before -> after):")
        for layer, v in sorted(rec.items(), key=lambda kv: -kv[1]["seconds"])[:args.show_layers]:
            print(f"  {layer}: {v['seconds']:.1f} s, {v['capture_seconds']:.1f} s, "
                  f"{v['loss_before']:.4g} -> {v['loss_after']:.4g}")


def _conv_outputs_fn(model, params):
    """``x [N, H, W, 3] -> {block: its reparam conv's output [N*H'*W', C]}`` of the float MobileOne
    (NHWC, every block that has a ``reparam_conv``), one jitted forward with captured intermediates."""
    import jax

    run = jax.jit(lambda x: model.apply({"params": params}, x, capture_intermediates=True)[1]["intermediates"])

    def outputs(x):
        convs = {name: np.asarray(d["reparam_conv"]["__call__"][0]) for name, d in run(x).items() if "reparam_conv" in d}
        return {name: a.reshape(-1, a.shape[-1]) for name, a in convs.items()}

    return outputs


def s0_ranges(model, variables, images, layers) -> None:
    """Per-channel ranges of ``layers`` (``stage3_17``) before / after cross-layer equalization:
    the weights' ``max|W|`` per output channel and the float output's per-channel max over
    ``images`` (what the per-tensor output quantizer has to cover)."""
    from cfws_jax.ptq.model import equalized_params

    eq, stats = equalized_params(model, variables["params"], (1, *images.shape[1:]))
    print(f"CLE: {stats['pairs']} pairs, {stats['iterations']} sweeps, last max |s-1| "
          f"{stats['max_scale_change']:.2g}, skipped {stats['skipped']}")
    print("\n| layer | params | weight range max / median (top channels) | output channel max: max / median "
          "(top channels) | channels under 1/100 of the max |")
    print("|---|---|---|---|---|")
    for tag, p in (("float", variables["params"]), ("CLE", eq)):
        outputs = _conv_outputs_fn(model, p)(images)
        for layer in layers:
            k = np.asarray(p[layer]["reparam_conv"]["kernel"])
            wr = np.abs(k.reshape(-1, k.shape[-1])).max(0)
            act = outputs[layer].max(0)

            def top(v):
                i = np.argsort(-v)[:3]
                return ", ".join(f"#{j} {v[j]:.3g}" for j in i)

            print(f"| {layer} | {tag} | {wr.max():.3g} / {np.median(wr):.3g} ({top(wr)}) | "
                  f"{act.max():.3g} / {np.median(act):.3g} ({top(act)}) | {int((act < act.max() / 100).sum())} of {len(act)} |")
    print(flush=True)


def s0_absorption(model, variables, images, batch: int = 32) -> None:
    """What high-bias absorption (Nagel et al. 2019) could take out of each ReLU output: a
    channel whose post-ReLU minimum over ``images`` is ``c_i > 0`` can hand ``c_i`` to the next
    layer's bias, which shrinks the per-tensor range from ``max_i M_i`` to ``max_i (M_i - c_i)``.
    Prints, per conv layer, the channels with ``c_i > 0`` and the range before / after."""
    outputs = _conv_outputs_fn(model, variables["params"])
    lo, hi = {}, {}
    for i in range(0, len(images), batch):
        for name, a in outputs(images[i:i + batch]).items():
            lo[name] = np.minimum(lo.get(name, np.inf), a.min(0))
            hi[name] = np.maximum(hi.get(name, -np.inf), a.max(0))
    print(f"\nhigh-bias absorption: per-channel minimum of each layer's output over {len(images)} views\n")
    print("| layer | channels with minimum > 0 | of them constant (min = max) | tensor max | tensor max after absorbing |")
    print("|---|---|---|---|---|")
    for name in sorted(lo, key=lambda n: [int(t) if t.isdigit() else t for t in n.replace("_", " ").split()]):
        c, m = np.maximum(lo[name], 0.0), hi[name]
        const = int(((c > 0) & np.isclose(c, m)).sum())
        print(f"| {name} | {int((c > 0).sum())} of {len(c)} | {const} | {m.max():.4g} | {(m - c).max():.4g} |")
    print(flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    c = sub.add_parser("cifar", help="the shipped CIFAR-10 RepVGG-A0, 3-seed tables")
    c.add_argument("--data", required=True)
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--settings", nargs="+", default=["8,8", "6,6", "4,8", "4,4"], help="w_bits,a_bits pairs")
    c.add_argument("--methods", nargs="+", default=list(CIFAR_METHODS))
    c.add_argument("--num-calib", type=int, default=256)
    c.add_argument("--every", type=int, default=1, help="evaluate every k-th test image (default 1: all 10,000)")
    c.add_argument("--iters", type=int, default=None, help="reconstruction iterations per layer")
    s = sub.add_parser("s0", help="MobileOne-S0 logits on held-out images, time and memory")
    s.add_argument("--s0", required=True)
    s.add_argument("--coco", required=True)
    s.add_argument("--s0-calib-images", type=int, default=64, help="COCO128 images used (4 views each)")
    s.add_argument("--methods", nargs="*", default=list(S0_METHODS), help="none: only --ranges / --absorption")
    s.add_argument("--iters", type=int, default=None)
    s.add_argument("--settings", nargs="+", default=["8,8"], help="w_bits,a_bits pairs (default 8,8)")
    s.add_argument("--ranges", nargs="*", default=[], metavar="LAYER",
                   help="print per-channel weight / output ranges of these blocks (stage3_17) before / after CLE")
    s.add_argument("--absorption", action="store_true",
                   help="print what high-bias absorption could remove from each layer's output range")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--show-layers", type=int, default=6)
    s.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    print_machine(torch_too=False)
    print()
    run_cifar(args) if args.part == "cifar" else run_s0(args)


if __name__ == "__main__":
    main()
