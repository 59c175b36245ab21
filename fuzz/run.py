"""Run the fuzz harnesses of :mod:`fuzz.targets`, each in its own process under an address-space
limit (``RLIMIT_AS``: the process's size after imports + ``--memory-mb``), and print executions,
exec/s, coverage and findings per target::

    python fuzz/run.py --seconds 60                   # every target, 60 s each
    python fuzz/run.py --seconds 600 --target torch_zip --engine atheris
    python fuzz/run.py --seconds 2 --engine hypothesis  # no native code needed (the CI smoke run)
    python fuzz/run.py --target npz_split --replay FILE...  # re-run inputs under the same limits
    python fuzz/run.py --keep                         # copy the grown corpora into fuzz/kept/

Engines: ``atheris`` (libFuzzer, coverage-guided; ``pip install atheris``; default when it
imports) and ``hypothesis`` (mutations of the seed files drawn by Hypothesis, which also
minimizes a failing input; coverage is not measured). Each campaign starts from the committed
seeds ``fuzz/corpus/<target>/``, the kept corpus ``fuzz/kept/<target>/`` and the past findings
``fuzz/regressions/<target>/``, and grows a working corpus in ``--workdir`` (never the repo).
A finding (another exception type, a bad refusal message, an allocation past the limit, an
input running past ``--timeout``, a crash) is saved under ``--findings``; a campaign restarts
after each one until its time is up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fuzz" / "corpus"
INSTRUMENTED = ["converters", "cfws_jax", "PIL", "numpy"]
INSTRUMENTED_STDLIB = ["pickle", "zipfile"]  # pure-Python parts the readers drive (SafeUnpickler, ZipFile)


def _vm_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))


def _limit_memory(extra_mb: int) -> int:
    limit = _vm_bytes() + extra_mb * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit


REGRESSIONS = ROOT / "fuzz" / "regressions"
KEPT = ROOT / "fuzz" / "kept"  # small inputs past atheris campaigns added for new coverage (--keep)


def _seed_dirs(name: str) -> list[Path]:
    """The committed seeds, the kept campaign corpus, and the minimized past findings."""
    return [d for d in (CORPUS / name, KEPT / name, REGRESSIONS / name) if d.is_dir()]


def _seeds(name: str) -> list[bytes]:
    """Seeds and past findings for the Hypothesis engine (the kept corpus is atheris's)."""
    return [p.read_bytes() for d in _seed_dirs(name) if d.parent != KEPT for p in sorted(d.iterdir()) if p.is_file()]


# ----------------------------------------------------------------------------- child: atheris

def _instrument_module(atheris, module) -> None:
    """Coverage instrumentation of a module's functions and its classes' methods, in place."""
    for obj in list(vars(module).values()):
        funcs = [obj] if callable(obj) and hasattr(obj, "__code__") else \
            [f for f in vars(obj).values() if hasattr(f, "__code__")] if isinstance(obj, type) else []
        for f in funcs:
            if getattr(f, "__module__", None) == module.__name__:
                atheris.instrument_func(f)


def child_atheris(args) -> None:
    import atheris

    with atheris.instrument_imports(include=INSTRUMENTED):
        from fuzz.targets import TARGETS, run_one, scratch_dir
        if args.child == "image_folder":  # the readers import Pillow lazily: load it and its plugins here
            from PIL import Image

            Image.init()
    for mod in INSTRUMENTED_STDLIB:  # already imported: instrument their functions in place
        _instrument_module(atheris, sys.modules[mod])
    target, workdir = TARGETS[args.child], scratch_dir()

    def one_input(data: bytes) -> None:
        run_one(target, data, workdir)

    corpus = Path(args.workdir) / args.child
    corpus.mkdir(parents=True, exist_ok=True)
    findings = Path(args.findings)
    findings.mkdir(parents=True, exist_ok=True)
    argv = [sys.argv[0], str(corpus), *map(str, _seed_dirs(args.child)), f"-max_total_time={args.seconds}",
            f"-timeout={args.timeout}", "-rss_limit_mb=0", "-malloc_limit_mb=0", "-print_final_stats=1",
            f"-artifact_prefix={findings}/{args.child}-", "-max_len=262144", "-len_control=50"]
    if args.runs:
        argv.append(f"-runs={args.runs}")
    atheris.Setup(argv, one_input)
    _limit_memory(args.memory_mb)
    atheris.Fuzz()


# ----------------------------------------------------------------------------- child: hypothesis

_OPS = ("flip", "set", "insert", "delete", "truncate", "repeat", "splice")


def mutate(seed: bytes, ops, other: bytes = b"") -> bytes:
    """Apply ``ops`` (``(op, position, payload)`` triples) to ``seed``; positions wrap."""
    data = bytearray(seed)
    for op, pos, payload in ops:
        at = pos % (len(data) + 1)
        if op == "flip" and data:
            data[at % len(data)] ^= 1 << (pos % 8)
        elif op == "set":
            data[at:at + len(payload)] = payload
        elif op == "insert":
            data[at:at] = payload
        elif op == "delete":
            del data[at:at + 1 + len(payload) * 64]
        elif op == "truncate":
            del data[at:]
        elif op == "repeat":
            data[at:at] = bytes(data[at:at + 1 + len(payload) * 8]) * (1 + pos % 64)
        elif op == "splice" and other:
            data[at:] = other[pos % len(other):]
    return bytes(data)


def fuzz_with_hypothesis(target, seeds: list[bytes], seconds: float, *, runs: int = 0, timeout: int = 10,
                         findings_dir: str | os.PathLike = "/tmp/cfws_fuzz_findings") -> dict:
    """Feed ``target`` each seed as is, then seed mutations drawn by Hypothesis (rounds of 200
    examples, seeded 0, 1, ...) for ``seconds`` (or ``runs`` executions); stop at the first finding, saved minimized (Hypothesis
    shrinks it and replays the minimal input last). Returns ``{"runs", "findings"}``."""
    from hypothesis import HealthCheck, Phase, given, seed, settings, strategies as st

    from fuzz.targets import run_one, scratch_dir

    workdir = scratch_dir()
    ops = st.lists(st.tuples(st.sampled_from(_OPS), st.integers(0, 2 ** 20), st.binary(max_size=8)), max_size=6)
    inputs = st.one_of(st.builds(mutate, st.sampled_from(seeds), ops, st.sampled_from(seeds)),
                       st.binary(max_size=512))
    state = {"runs": 0, "last": b""}

    @settings(max_examples=200, deadline=None, database=None, phases=(Phase.generate, Phase.shrink),
              report_multiple_bugs=False, suppress_health_check=list(HealthCheck))
    @given(inputs)
    def fuzz(data):
        state["runs"] += 1
        state["last"] = data
        run_one(target, data, workdir, alarm_s=timeout)

    end, rnd, findings = time.monotonic() + seconds, -1, []
    while time.monotonic() < end and not (runs and state["runs"] >= runs):
        try:
            if rnd < 0:  # every seed and past finding once, as is
                for data in seeds:
                    state["runs"], state["last"] = state["runs"] + 1, data
                    run_one(target, data, workdir, alarm_s=timeout)
            else:
                seed(rnd)(fuzz)()
        except BaseException as e:  # noqa: BLE001 - the finding
            path = Path(findings_dir) / f"{target.name}-hypothesis-{hashlib.sha1(state['last']).hexdigest()[:12]}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(state["last"])
            first = str(e).splitlines()[0][:200] if str(e) else ""
            findings.append(f"{type(e).__name__}: {first} [{path}]")
            break
        rnd += 1
    return {"runs": state["runs"], "findings": findings}


def child_hypothesis(args) -> None:
    from fuzz.targets import TARGETS

    _limit_memory(args.memory_mb)
    status = fuzz_with_hypothesis(TARGETS[args.child], _seeds(args.child), args.seconds, runs=args.runs,
                                  timeout=args.timeout, findings_dir=args.findings)
    print("FUZZ-STATUS " + json.dumps(status), flush=True)


# ----------------------------------------------------------------------------- child: replay

def child_replay(args) -> None:
    """Run each ``--replay`` file once under the same limits; print its outcome or traceback."""
    import traceback

    from fuzz.targets import TARGETS, run_one, scratch_dir

    target, workdir, failed = TARGETS[args.child], scratch_dir(), 0
    _limit_memory(args.memory_mb)
    for path in args.replay:
        try:
            print(f"{path}: {'accepted' if run_one(target, Path(path).read_bytes(), workdir, args.timeout) else 'refused'}")
        except BaseException:  # noqa: BLE001 - the finding, shown
            print(f"{path}: FINDING", flush=True)
            traceback.print_exc()
            failed += 1
    sys.stdout.flush()
    if failed:
        raise SystemExit(1)


# ----------------------------------------------------------------------------- parent

def _parse_libfuzzer(text: str) -> dict:
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    cov = re.findall(r"\bcov: (\d+) ft: (\d+)", text)
    units = re.findall(r"Test unit written to (\S+)", text)
    return {"runs": int(runs[-1]) if runs else 0, "cov": int(cov[-1][0]) if cov else None,
            "ft": int(cov[-1][1]) if cov else None,
            "artifacts": [u for u in units if "-slow-unit-" not in u],  # crash-, timeout-, oom-
            "slow_units": [u for u in units if "-slow-unit-" in u]}  # > 10 s wall (load): replay to judge


def _error_line(text: str) -> str:
    """The Python exception line of a failed child (else libFuzzer's own error line)."""
    py = [ln for ln in text.splitlines() if re.match(r"^([\w.]+\.)?\w*(Error|Exception|Finding|Hang|Exit)\b", ln)]
    lib = [ln for ln in text.splitlines() if "ERROR: libFuzzer" in ln or "==ERROR" in ln]
    lines = py or lib
    return lines[-1].strip()[:240] if lines else "process died"


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _child_env() -> dict:
    return dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def run_target(name: str, args) -> dict:
    """Fuzz one target for ``args.seconds`` (restarting after a finding) and summarise it."""
    env, cpu0 = _child_env(), _children_cpu()
    start, summary = time.monotonic(), {"target": name, "engine": args.engine, "runs": 0, "cov": None,
                                        "ft": None, "findings": []}
    while True:
        left = args.seconds - (time.monotonic() - start)
        ran = summary["runs"] or summary["findings"]
        if (left < 1 and ran or summary["findings"] and args.stop_on_finding
                or args.runs and summary["runs"] >= args.runs):
            break
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--engine", args.engine,
               "--seconds", str(max(1, int(left))), "--timeout", str(args.timeout), "--memory-mb",
               str(args.memory_mb), "--workdir", args.workdir, "--findings", args.findings,
               "--runs", str(max(1, args.runs - summary["runs"]) if args.runs else 0)]
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace",
                                 timeout=left + args.timeout + 600)
        except subprocess.TimeoutExpired as e:
            summary["findings"].append(f"harness process hung past its budget ({e.timeout:.0f} s)")
            break
        text = out.stdout + out.stderr
        if args.engine == "atheris":
            stats = _parse_libfuzzer(text)
            summary["runs"] += stats["runs"]
            summary["cov"], summary["ft"] = stats["cov"] or summary["cov"], stats["ft"] or summary["ft"]
            summary["slow_units"] = summary.get("slow_units", []) + stats["slow_units"]
            if stats["artifacts"] or out.returncode != 0:
                summary["findings"].append(f"{_error_line(text)} [{', '.join(stats['artifacts'])}]")
                if not stats["artifacts"]:
                    break
                continue
            break
        status = [ln for ln in out.stdout.splitlines() if ln.startswith("FUZZ-STATUS ")]
        if not status:
            summary["findings"].append(f"process exited {out.returncode}: {_error_line(text)}")
            break
        st = json.loads(status[-1][len("FUZZ-STATUS "):])
        summary["runs"] += st["runs"]
        summary["findings"] += st["findings"]
        if not st["findings"]:
            break
    summary["seconds"] = round(time.monotonic() - start, 1)
    summary["cpu_seconds"] = round(_children_cpu() - cpu0, 1)
    summary["exec_per_s"] = round(summary["runs"] / max(summary["seconds"], 1e-9), 1)
    summary["exec_per_cpu_s"] = round(summary["runs"] / max(summary["cpu_seconds"], 1e-9), 1)
    return summary


def keep_corpus(work: Path, kept: Path, budget: int, max_len: int = 8192) -> int:
    """Replace ``kept`` by the smallest inputs of ``work`` (each at most ``max_len`` bytes) that
    fit ``budget`` bytes; returns how many."""
    files = sorted((p for p in work.iterdir() if p.is_file() and p.stat().st_size <= max_len),
                   key=lambda p: (p.stat().st_size, p.name)) if work.is_dir() else []
    if kept.is_dir():
        for old in kept.iterdir():
            old.unlink()
    kept.mkdir(parents=True, exist_ok=True)
    total = n = 0
    for p in files:
        if total + p.stat().st_size > budget:
            break
        (kept / p.name).write_bytes(p.read_bytes())
        total, n = total + p.stat().st_size, n + 1
    return n


def _default_engine() -> str:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return "hypothesis"
    return "atheris"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60, help="fuzzing time per target")
    p.add_argument("--target", action="append", help="only this target (repeatable; default: all)")
    p.add_argument("--engine", choices=("atheris", "hypothesis"), default=None)
    p.add_argument("--timeout", type=int, default=10, help="seconds one input may run (a hang past it is a finding)")
    p.add_argument("--memory-mb", type=int, default=1024, help="allocation allowed on top of the process's size")
    p.add_argument("--runs", type=int, default=0, help="stop a target after this many executions (0: time only)")
    p.add_argument("--workdir", default="/tmp/cfws_fuzz_corpus", help="working corpus (grown by atheris)")
    p.add_argument("--findings", default="/tmp/cfws_fuzz_findings", help="where failing inputs are written")
    p.add_argument("--stop-on-finding", action="store_true")
    p.add_argument("--json", help="also write the per-target summaries here")
    p.add_argument("--keep", action="store_true", help="instead of fuzzing: copy each target's --workdir corpus "
                   "(inputs that added coverage), smallest first, into fuzz/kept/<target>/ up to --keep-bytes")
    p.add_argument("--keep-bytes", type=int, default=96 * 1024, help="size budget of one target's kept corpus")
    p.add_argument("--replay", nargs="+", help="run these input files once (with one --target), under the limits")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.engine = args.engine or _default_engine()
    if args.child:
        sys.path.insert(0, str(ROOT))
        (child_replay if args.replay else child_atheris if args.engine == "atheris" else child_hypothesis)(args)
        return 0
    from fuzz.targets import TARGETS  # not before a child's import: atheris must instrument it

    unknown = sorted(set(args.target or ()) - set(TARGETS))
    if unknown:
        p.error(f"unknown target(s) {unknown}; choose from {sorted(TARGETS)}")
    if args.replay:
        if len(args.target or ()) != 1:
            p.error("--replay needs exactly one --target")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", args.target[0], "--timeout",
               str(args.timeout), "--memory-mb", str(args.memory_mb), "--replay", *args.replay]
        return subprocess.run(cmd, env=_child_env()).returncode
    if args.keep:
        for name in args.target or sorted(TARGETS):
            print(f"{name:16s} kept {keep_corpus(Path(args.workdir) / name, KEPT / name, args.keep_bytes)} inputs")
        return 0
    rows = []
    print(f"{'target':16s} {'engine':10s} {'execs':>10s} {'exec/s':>8s} {'cpu s':>7s} {'exec/cpu-s':>10s} "
          f"{'cov':>6s} {'ft':>6s}  findings", flush=True)
    for name in args.target or sorted(TARGETS):
        s = run_target(name, args)
        rows.append(s)
        cov = "-" if s["cov"] is None else str(s["cov"])
        ft = "-" if s["ft"] is None else str(s["ft"])
        print(f"{name:16s} {s['engine']:10s} {s['runs']:10d} {s['exec_per_s']:8.1f} {s['cpu_seconds']:7.1f} "
              f"{s['exec_per_cpu_s']:10.1f} {cov:>6s} {ft:>6s}  {len(s['findings'])}", flush=True)
        for f in s["findings"]:
            print(f"    finding: {f}", flush=True)
        for u in s.get("slow_units", []):
            print(f"    slow unit (not a finding unless --replay is slow too): {u}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(s["findings"] for s in rows) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
