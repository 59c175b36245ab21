"""Benchmark 5 of issue 12: run benchmarks 1-4 in one go (a few minutes on a GPU machine) and
print everything they print, each under a header, for pasting into the README.

Needs jax, flax, optax, orbax, torch, timm and Pillow; no tensorflow and no ``../shared`` data
(every benchmark makes its own random weights, images and JPEG folder). Each script runs in
its own process with this checkout on ``PYTHONPATH`` (no install needed), so JAX's device
memory and XLA flags do not leak from one to the next.

1. ``bench_entropy_network.py``: jitted vs NumPy KL searches on every point of RepVGG-A0 and
   MobileOne-S0;
2. ``bench_ptq.py``: one-pass sequential ``cfws_kl`` PTQ against one float forward (and the
   per-point reference driver, bit-identity);
3. ``bench_throughput.py``: PyTorch eager (on the GPU when there is one) vs JAX float /
   fake-quant / integer;
4. ``bench_eval_rate.py``: JPEG folder -> top-1 images/s, source alone, model alone, end to end
   on 1 device and on 4 forced CPU devices.

    python benchmarks/run_all.py [--quick] [--only 1,3] [--timeout 600]

``--quick``: the small settings of each script (a smoke run of a few minutes on a 2-core CPU).
On a GPU the defaults are used, with batch 256 for the throughput benchmark.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def plan(quick: bool, gpu: bool) -> list[tuple[str, str, list[str]]]:
    if quick:
        return [("1", "bench_entropy_network.py", ["--quick"]),
                ("2", "bench_ptq.py", ["--quick"]),
                ("3", "bench_throughput.py", ["--quick"]),
                ("4", "bench_eval_rate.py", ["--quick"])]
    return [("1", "bench_entropy_network.py", []),
            ("2", "bench_ptq.py", [] if gpu else ["--no-reference"]),
            ("3", "bench_throughput.py", ["--batch", "256", "--rounds", "10"] if gpu else []),
            ("4", "bench_eval_rate.py", ["--images", "512", "--batch", "128"] if gpu else [])]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated benchmark numbers (default: all)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per benchmark")
    a = ap.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # this process only lists the devices
    import _common
    import jax

    gpu = jax.default_backend() == "gpu"
    _common.print_machine()
    only = {s for s in a.only.split(",") if s}
    failed = []
    t_all = time.perf_counter()
    for num, script, args in plan(a.quick, gpu):
        if only and num not in only:
            continue
        cmd = [sys.executable, str(HERE / script), *args]
        print(f"\n{'=' * 100}\nbenchmark {num}: {' '.join(['python', 'benchmarks/' + script, *args])}\n{'=' * 100}",
              flush=True)
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, timeout=a.timeout, stdout=sys.stdout, stderr=subprocess.PIPE,
                               text=True)
            rc, err = r.returncode, r.stderr
        except subprocess.TimeoutExpired as e:
            rc, err = "timeout", (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        print(f"[benchmark {num}: {time.perf_counter() - t0:.0f} s, exit {rc}]", flush=True)
        if rc != 0:
            failed.append(num)
            print("stderr (last lines):\n" + "\n".join(err.strip().splitlines()[-25:]), flush=True)
    print(f"\nall done in {time.perf_counter() - t_all:.0f} s; "
          f"{'failed: ' + ', '.join(failed) if failed else 'every benchmark ran'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
