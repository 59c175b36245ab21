"""Shared fixtures. Real data lives in ``../shared/data`` (override: ``CFWS_JAX_SHARED_DATA``);
tests that need it skip cleanly when it is absent."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("CFWS_JAX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_file(name: str) -> Path:
    """Path of a file in the shared data folder, or skip the calling test if it is absent."""
    path = shared_data_dir() / name
    if not path.exists():
        pytest.skip(f"shared data file {path} not present")
    return path


def memory_mappings() -> int:
    """How many memory mappings this process holds (Linux ``/proc/self/maps``; 0 elsewhere)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


# Linux refuses new mappings past vm.max_map_count (65,530 by default); LLVM then segfaults
# inside XLA's compiler instead of raising. Fail the file that got close, with the reason.
MAPPINGS_LIMIT = 40_000


@pytest.fixture(autouse=True, scope="module")
def release_compiled_code():
    """After each test file, drop JAX's compiled executables. Every XLA:CPU executable keeps a
    few memory mappings for its machine code; an xdist worker that runs dozens of files and
    keeps them all passed the kernel's mapping limit, and the next compile segfaulted."""
    yield
    if "jax" not in sys.modules:
        return
    sys.modules["jax"].clear_caches()
    gc.collect()
    held = memory_mappings()
    if held > MAPPINGS_LIMIT:
        pytest.fail(f"this test file left {held} memory mappings after jax.clear_caches() "
                    f"(limit {MAPPINGS_LIMIT}; the kernel's vm.max_map_count is 65,530): "
                    "something keeps compiled executables alive")


@pytest.fixture
def shared_data():
    """Callable fixture: ``shared_data("mobileone_s0_deploy_awkrail.npz") -> Path`` (or skip)."""
    return shared_file


def load_script(path):
    """Import an example script (``examples/*.py``) as a module, without running its ``main``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def numpy_init(model, input_shape, seed: int = 0, **kwargs):
    """Variables of a Flax ``model`` filled from NumPy (fan-in scaled normal kernels, small
    biases, unit BN scales / variances): avoids compiling ``model.init``'s random ops, which
    takes seconds per model on the CPU backend."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(input_shape), **kwargs))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        leaf = path[-1].key
        if leaf == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            return (rng.normal(0, 1, s.shape) / np.sqrt(fan_in)).astype(np.float32)
        if leaf in ("scale", "var"):
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        return rng.normal(0, 0.1, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


class MemorySource:
    """The minimal evaluation source ``cfws_jax.evaluate.evaluate_classifier`` reads: in-memory
    NHWC images ``x`` and labels ``y``; a limit picks images as the real sources do."""

    spec, split, num_classes = "memory", "test", 10

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.num_images = len(y)

    def count(self, limit=None):
        return len(self.y) if limit is None else min(limit, len(self.y))

    def known_labels(self):
        return self.y

    def subset(self, limit=None, subset="balanced"):
        from cfws_jax.data.source import subset_indices

        return subset_indices(len(self.y), self.count(limit), self.y, subset)

    def iter_batches(self, batch_size, limit=None, subset="balanced"):
        idx = self.subset(limit, subset)
        for s in range(0, len(idx), batch_size):
            yield self.x[idx[s:s + batch_size]], self.y[idx[s:s + batch_size]]
