"""Data parallelism over local devices with JAX's SPMD machinery (``jax.sharding``).

A 1-D :class:`jax.sharding.Mesh` with axis ``"batch"``: image batches are sharded along their
leading (batch) axis, parameters are replicated, and ``jax.jit`` partitions the program (XLA
inserts the cross-device reductions). A batch whose size is not a multiple of the device count
is padded with zero rows; the returned row mask (bool ``[B_padded]``, sharded like the batch) is
``False`` on padding rows, and every statistic and metric of the callers ignores those rows.

Multi-host: call :func:`initialize_distributed` (``jax.distributed.initialize``) on every host
before anything else touches JAX; ``local_mesh()`` then spans the devices of every host. Every
host runs the same program on the same host batches (a deterministic input pipeline): each
transfers only the rows of its own devices (:func:`shard_batch`), and results that the host
reads (metric counts, calibration maxima and histograms) are reduced over all devices by XLA.
"""

from __future__ import annotations

import sys
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"


def local_mesh(devices: int | Sequence | Mesh | None = None) -> Mesh:
    """1-D mesh (axis ``"batch"``) over ``devices``: None = every device of the run (this host's;
    after ``jax.distributed.initialize``, every host's), an int N = the first N local devices,
    or a sequence of ``jax.Device``; a Mesh is returned unchanged."""
    if isinstance(devices, Mesh):
        return devices
    local = jax.local_devices()
    if devices is None:
        devs = jax.devices()
    elif isinstance(devices, (int, np.integer)):
        if not 1 <= int(devices) <= len(local):
            raise ValueError(f"--devices {int(devices)}: this host has {len(local)} local device(s) "
                             f"({', '.join(str(d) for d in local)})")
        devs = local[: int(devices)]
    else:
        devs = list(devices)
        if not devs:
            raise ValueError("local_mesh: empty device list")
    return Mesh(np.asarray(devs, dtype=object), (AXIS,))


def num_devices(mesh: Mesh) -> int:
    return int(mesh.devices.size)


def device_list(mesh: Mesh) -> list[str]:
    """The mesh's devices as strings (``"TFRT_CPU_0"``, ``"cuda:0"``), for logs and ``--json``."""
    return [str(d) for d in mesh.devices.flat]


def describe(mesh: Mesh) -> str:
    devs = device_list(mesh)
    return f"{len(devs)} device{'s' if len(devs) != 1 else ''}: {', '.join(devs)}"


def log_devices(mesh: Mesh, file=None) -> None:
    """Print ``devices: N device(s): ...`` on stderr (the commands' device line)."""
    print(f"devices: {describe(mesh)}", file=file or sys.stderr)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the mesh, the other axes whole."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
    """Every array leaf of ``tree`` copied to every device of the mesh (parameters)."""
    return jax.device_put(tree, replicated(mesh))


def padded_size(n: int, mesh: Mesh) -> int:
    """``n`` rounded up to a multiple of the device count (at least one row per device)."""
    d = num_devices(mesh)
    return max(d, -(-int(n) // d) * d)


def shard_batch(x, mesh: Mesh, size: int | None = None, mask=None):
    """``(x_sharded, mask_sharded)``: host or device batch ``x [b, ...]`` padded with zero rows
    to ``padded_size(max(b, size))`` and split along axis 0 over ``mesh``.

    ``mask``: optional bool ``[b]`` of the rows that count (default all); the padding rows are
    ``False``. Both outputs carry ``NamedSharding(mesh, P("batch"))``.
    """
    b = int(x.shape[0])
    n = padded_size(max(b, int(size or 0)), mesh)
    m = np.ones((b,), bool) if mask is None else np.asarray(mask, bool)
    if m.shape != (b,):
        raise ValueError(f"shard_batch: mask of shape {m.shape} for a batch of {b} rows")
    if n > b:
        x = np.asarray(x)
        x = np.concatenate([x, np.zeros((n - b,) + x.shape[1:], x.dtype)])
        m = np.concatenate([m, np.zeros((n - b,), bool)])
    s = batch_sharding(mesh)
    if is_multi_process(mesh):  # every host holds the whole batch; each puts only its own rows
        x, m = np.asarray(x), np.asarray(m)
        return (jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]),
                jax.make_array_from_callback(m.shape, s, lambda idx: m[idx]))
    return jax.device_put(x, s), jax.device_put(m, s)


def is_multi_process(mesh: Mesh) -> bool:
    """True when the mesh holds devices of other processes (a multi-host run)."""
    return any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def to_host(x, mesh: Mesh):
    """``x`` (sharded over ``mesh``) as a NumPy array on this host; in a multi-host run the
    array is first replicated (all-gathered) so that every host reads all of it."""
    if is_multi_process(mesh):
        x = jax.jit(lambda a: a, out_shardings=replicated(mesh))(x)
    return np.asarray(jax.device_get(x))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` for a multi-host run (call before any other JAX use);
    arguments left None are taken from the cluster environment (SLURM, TPU pods, ...)."""
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def add_devices_arg(parser) -> None:
    """The commands' ``--devices N`` flag (default: every local device)."""
    parser.add_argument("--devices", type=int, default=None, metavar="N",
                        help="run data parallel on the first N local devices (default: all of them)")
    parser.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                        help="multi-host: address of process 0; runs jax.distributed.initialize (with "
                        "--num-processes and --process-id) and uses every host's devices")
    parser.add_argument("--num-processes", type=int, default=None, metavar="N", help="multi-host: hosts")
    parser.add_argument("--process-id", type=int, default=None, metavar="I", help="multi-host: this host, 0..N-1")


def mesh_from_args(args, file=None) -> Mesh:
    """The mesh for ``args.devices`` (None: all local devices), its device line printed on stderr."""
    n = getattr(args, "devices", None)
    if n is not None and n < 1:
        raise ValueError(f"--devices must be >= 1, got {n}")
    if getattr(args, "coordinator", None):
        if n is not None:
            raise ValueError("--devices cannot be combined with --coordinator (a multi-host run uses every device)")
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    mesh = local_mesh(n)
    log_devices(mesh, file)
    return mesh
