"""``cfws-jax version``: print the package and backend versions."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("version", help="print cfws-jax, jax and flax versions and the JAX backend")
    p.set_defaults(func=run)


def run(args) -> int:
    import flax
    import jax

    import cfws_jax

    print(f"cfws-jax {cfws_jax.__version__}")
    print(f"jax {jax.__version__} (backend: {jax.default_backend()}, devices: {jax.devices()})")
    print(f"flax {flax.__version__}")
    return 0
