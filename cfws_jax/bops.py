"""BOPs accounting: ``BOPs = Σ_layers MACs · b_w · b_a`` (ALGORITHM.md §3.7).

For a k×k conv with ``M = O · (I/g) · k² · H' · W'`` MACs, with ``b_w = w_bits``, ``b_a = a_bits``:

* ``"int8"``: plain conv, ``M · b_w · b_a`` (64 M at 8/8);
* ``"int16_weights"``: 16-bit weights, ``M · 16 · b_a`` (2× int8 at 8/8);
* ``"w16a16"``: ``M · 16 · 16`` (4×);
* ``"cfws"``: fine k×k conv + coarse 1×1 conv (``O · (I/g) · H' · W' = M / k²`` MACs), both at
  ``b_w · b_a``: ``(1 + 1/k²)`` × int8, i.e. 10/9 for 3×3. Layers that cannot be split (even or
  1×1 kernels) cost as ``"int8"``;
* ``"split_whole"``: two full k×k convs (ablation without centre extraction), 2×.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

Scheme = Literal["int8", "int16_weights", "w16a16", "cfws", "split_whole"]
SCHEMES = ("int8", "int16_weights", "w16a16", "cfws", "split_whole")


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """A square conv: k, in/out channels, groups, output height/width (a Dense layer is k=1, 1×1 output)."""

    kernel_size: int
    in_channels: int
    out_channels: int
    groups: int = 1
    out_h: int = 1
    out_w: int = 1

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ConvGeometry.{f.name} must be a positive int, got {v!r}")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"ConvGeometry: in_channels {self.in_channels} and out_channels {self.out_channels} "
                f"must be divisible by groups {self.groups}"
            )

    @classmethod
    def from_kernel(cls, kernel_shape, out_h: int, out_w: int, groups: int = 1) -> "ConvGeometry":
        """Geometry of an HWIO kernel ``[k, k, I/g, O]`` producing an ``out_h × out_w`` map."""
        kh, kw, ig, o = (int(d) for d in kernel_shape)
        if kh != kw:
            raise ValueError(f"only square kernels are supported, got HWIO shape {tuple(kernel_shape)}")
        return cls(kh, ig * groups, o, groups, int(out_h), int(out_w))

    @property
    def splittable(self) -> bool:
        """Odd k > 1 (CFWS can extract a centre tap)."""
        return self.kernel_size > 1 and self.kernel_size % 2 == 1


def conv_macs(g: ConvGeometry) -> int:
    """Multiply-accumulates ``O · (I/g) · k² · H' · W'``."""
    return g.out_channels * (g.in_channels // g.groups) * g.kernel_size**2 * g.out_h * g.out_w


def layer_bops(g: ConvGeometry, scheme: Scheme, w_bits: int = 8, a_bits: int = 8) -> int:
    """Bit operations of one conv under ``scheme`` (see the module docstring)."""
    macs = conv_macs(g)
    if scheme == "int8":
        return macs * w_bits * a_bits
    if scheme == "int16_weights":
        return macs * 16 * a_bits
    if scheme == "w16a16":
        return macs * 16 * 16
    if scheme == "cfws":
        coarse = macs // g.kernel_size**2 if g.splittable else 0
        return (macs + coarse) * w_bits * a_bits
    if scheme == "split_whole":
        return 2 * macs * w_bits * a_bits
    raise ValueError(f"unknown BOPs scheme {scheme!r}; expected one of {SCHEMES}")


def network_bops(layers: Sequence[tuple], w_bits: int = 8, a_bits: int = 8) -> dict:
    """Per-layer and total MACs/BOPs of ``layers``: items ``(geometry, scheme)`` or ``(name, geometry, scheme)``.

    Returns ``{"layers": [{name, scheme, macs, bops, int8_bops, ratio_vs_int8}], "total_macs",
    "total_bops", "total_int8_bops", "ratio_vs_int8"}``; ``int8`` is the all-``"int8"`` baseline.
    """
    rows = []
    for i, item in enumerate(layers):
        if len(item) == 2:
            name, (geom, scheme) = str(i), item
        elif len(item) == 3:
            name, geom, scheme = item
        else:
            raise ValueError(f"layer {i}: expected (geometry, scheme) or (name, geometry, scheme), got {item!r}")
        try:
            bops = layer_bops(geom, scheme, w_bits, a_bits)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
        base = layer_bops(geom, "int8", w_bits, a_bits)
        rows.append(dict(name=str(name), scheme=scheme, macs=conv_macs(geom), bops=bops, int8_bops=base, ratio_vs_int8=bops / base))
    total = sum(r["bops"] for r in rows)
    base = sum(r["int8_bops"] for r in rows)
    return dict(
        layers=rows,
        total_macs=sum(r["macs"] for r in rows),
        total_bops=total,
        total_int8_bops=base,
        ratio_vs_int8=total / base if base else float("nan"),
    )
