"""The paper's comparisons on the shipped CIFAR-10 RepVGG-A0, over several calibration seeds.

Prints, as Markdown tables with mean ± std over the seeds (each seed draws a different sample of
calibration images from the training split):

1. the demo table: float vs minmax / kl / cfws_minmax / cfws_kl at each bit setting, with BOPs;
2. an ablation in the shape of the paper's Table 6: activation method alone (plain weights,
   transformed KL + ReLU fusion), CFWS alone (CFWS weights, max ranges), both (cfws_kl);
3. the metric comparison of its Table 2: CFWS weights with MSE, cosine, TensorRT KL and the
   transformed KL activation searches.

    python benchmarks/bench_cifar_tables.py --data ../shared/data/cifar10_jpeg_yoongikim.npz \
        [--limit 1000] [--seeds 0 1 2] [--settings 8,8 6,6]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from cfws_jax.demo import ShippedExperiment
from cfws_jax.ptq import QuantConfig, get_preset

MAIN = {"minmax": get_preset("minmax"), "kl": get_preset("kl"), "cfws_minmax": get_preset("cfws_minmax"),
        "cfws_kl": get_preset("cfws_kl")}
ABLATION = {"neither (minmax)": get_preset("minmax"),
            "activation method alone": QuantConfig(cfws=False, act_method="kl_cfws", relu_fusion=True),
            "CFWS alone": get_preset("cfws_minmax"), "both (cfws_kl)": get_preset("cfws_kl")}
METRICS = {m: get_preset("cfws_kl", act_method=m) for m in ("mse", "cosine", "entropy", "kl_cfws")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=1000, help="test images (default 1000; 0 = all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=["8,8", "6,6"], help="w_bits,a_bits pairs")
    args = p.parse_args(argv)
    settings = [tuple(int(v) for v in s.split(",")) for s in args.settings]

    exp = ShippedExperiment.load(args.data, None if args.limit == 0 else args.limit)
    float_top1 = exp.float_top1()
    print(f"{exp.arch}, {exp.limit} CIFAR-10 test images, calibration 32 train images, seeds {args.seeds}, "
          f"device {jax.devices()[0]}; float top-1 {100 * float_top1:.2f}%\n")

    cache: dict = {}

    def run(cfg: QuantConfig, seed: int):
        if (cfg, seed) not in cache:
            cache[(cfg, seed)] = exp.quantized_top1(cfg, exp.calibration(32, seed))
        return cache[(cfg, seed)]

    def table(title, configs, with_bops=False):
        t0 = time.perf_counter()
        print(f"### {title}\n")
        head = "| setting | configuration | top-1 (%) mean ± std | drop (pts) |" + (" BOPs vs INT8 |" if with_bops else "")
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for w, a in settings:
            for name, cfg in configs.items():
                res = [run(cfg.replace(w_bits=w, a_bits=a), s) for s in args.seeds]
                acc = 100 * np.array([r[0] for r in res])
                line = (f"| W{w}A{a} | {name} | {acc.mean():.2f} ± {acc.std():.2f} | "
                        f"{acc.mean() - 100 * float_top1:+.2f} |")
                if with_bops:
                    line += f" {res[0][1]:.3f}x |"
                print(line, flush=True)
        print(f"\n({time.perf_counter() - t0:.0f} s)\n", flush=True)

    table("Presets (the demo table)", MAIN, with_bops=True)
    table("Ablation (paper Table 6 shape)", ABLATION)
    table("Activation metric with CFWS weights (paper Table 2 shape)", METRICS)


if __name__ == "__main__":
    main()
