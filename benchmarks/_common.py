"""Helpers shared by the issue-12 benchmarks (not part of the library): the machine line, a
median timer, and random-weight timm models converted to Flax deploy variables.

Every benchmark prints :func:`machine_lines` first, so a pasted result names the CPU model,
the cores this process may use, the jax / jaxlib / torch versions, the device list, the load
average (other work on a shared CPU skews every figure) and the XLA flags in force.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # measure this checkout's cfws_jax, not another installed one
    sys.path.insert(0, REPO_ROOT)


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_lines(torch_too: bool = True) -> list[str]:
    """Lines naming the machine; imports jax (and torch when ``torch_too`` and installed)."""
    import jax
    import jaxlib

    lines = [f"machine: {platform.node() or 'host'} | {platform.platform()} | CPU {cpu_model()} | "
             f"{usable_cores()} usable cores ({os.cpu_count()} online)"]
    versions = f"python {platform.python_version()} | jax {jax.__version__} | jaxlib {jaxlib.__version__}"
    if torch_too:
        try:
            import torch

            versions += f" | torch {torch.__version__} (threads {torch.get_num_threads()})"
            if torch.cuda.is_available():
                versions += f" | torch cuda {torch.cuda.get_device_name(0)}"
        except ImportError:
            versions += " | torch not installed"
    import cfws_jax

    lines.append(versions + f" | cfws_jax from {os.path.dirname(os.path.dirname(cfws_jax.__file__))}")
    devs = jax.devices()
    kinds = sorted({getattr(d, "device_kind", "?") for d in devs})
    lines.append(f"devices ({jax.default_backend()}, {len(devs)}): {', '.join(str(d) for d in devs)} "
                 f"[{', '.join(kinds)}]")
    lines.append(f"load average (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in os.getloadavg())} "
                 "(the CPU may be shared with other work)")
    lines.append(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(none)'}")
    return lines


def print_machine(torch_too: bool = True) -> None:
    for line in machine_lines(torch_too):
        print(line, flush=True)


def load_line() -> str:
    return "load average now: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def timed(fn) -> float:
    """Seconds of one ``fn()`` call; ``fn`` must block until its work is done."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cpu_timed(fn) -> float:
    """CPU seconds of the whole process (every thread) during one blocking ``fn()`` call."""
    t = time.process_time()
    fn()
    return time.process_time() - t


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls of a blocking ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def timm_deploy(arch: str, seed: int = 0, num_classes: int | None = None):
    """``(torch deploy model (eval), Flax deploy variables, arch)`` of timm ``arch`` with random
    weights (timm's own init, seeded), fused with timm's ``reparameterize_model`` and converted
    by :func:`converters.convert.convert_state_dict` (HWIO kernels, NHWC model)."""
    import torch
    import timm
    from timm.utils.model import reparameterize_model

    from converters.convert import convert_state_dict

    torch.manual_seed(seed)
    kw = {} if num_classes is None else {"num_classes": num_classes}
    tm = reparameterize_model(timm.create_model(arch, pretrained=False, **kw).eval())
    sd = {k: v.detach().cpu().numpy().copy() for k, v in tm.state_dict().items()}
    res = convert_state_dict(sd)
    if res.form != "deploy":
        raise RuntimeError(f"{arch}: expected a deploy-form state dict after reparameterize_model, got {res.form}")
    return tm, res.variables, res.arch
