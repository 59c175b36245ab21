"""``cfws-jax version``: print the package and backend versions and the devices JAX sees."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("version", help="print cfws-jax, jax and flax versions, the JAX backend and its devices")
    p.set_defaults(func=run)


def device_summary(devices, backend: str) -> str:
    """``"backend: gpu, 2 devices: NVIDIA H100 80GB HBM3 x2 (cuda:0, cuda:1)"``: the platform, the
    count, each device kind with its count, and the device names (whatever the backend)."""
    kinds: dict[str, int] = {}
    for d in devices:
        kind = str(getattr(d, "device_kind", None) or d.platform)
        kinds[kind] = kinds.get(kind, 0) + 1
    what = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in kinds.items())
    names = ", ".join(str(d) for d in devices)
    return f"backend: {backend}, {len(devices)} device{'s' if len(devices) != 1 else ''}: {what} ({names})"


def run(args) -> int:
    import flax
    import jax
    import jaxlib

    import cfws_jax

    print(f"cfws-jax {cfws_jax.__version__}")
    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}")
    print(device_summary(jax.devices(), jax.default_backend()))
    print(f"flax {flax.__version__}")
    return 0
