"""One harness per entry point a user's file reaches; each takes the fuzzer's bytes.

A harness writes the bytes where the public function expects a file (a temp file, or an image
inside a class folder), calls the function, and returns. The library's documented refusals
(:class:`converters.errors.CheckpointError` for checkpoint readers, :class:`cfws_jax.data.DataError`
for data readers) are clean only when their message is one line that names the file and does not
hide an out-of-memory; anything else escapes as a finding: another exception type, a
:class:`Finding` (bad refusal message), a :class:`Hang` (``alarm_s``), or a crash of the process.
"""

from __future__ import annotations

import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cfws_jax.data import DataError, open_source
from cfws_jax.data.coco import read_instances
from converters.errors import CheckpointError
from converters.module_classes import YOLOV6_MODULE_CLASSES
from converters.safetensors_reader import load_safetensors
from converters.torch_reader import read_state_dict

IMAGE_SIZE = 16  # output side of the image-folder harness (decoding is the part under test)


class Finding(AssertionError):
    """A documented refusal that is not clean (multi-line, unnamed file, hidden MemoryError)."""


class Hang(BaseException):
    """One input ran past the harness alarm (a BaseException, so no reader's catch-all hides it)."""


@dataclass(frozen=True)
class Target:
    """``call(path)`` reads the file at ``path``; ``refusals``: the documented error types;
    ``place(data, workdir) -> path`` puts the bytes where ``call`` looks."""
    name: str
    call: Callable[[Path], object]
    refusals: tuple[type[BaseException], ...]
    place: Callable[[bytes, Path], Path]
    doc: str


def _file(suffix: str) -> Callable[[bytes, Path], Path]:
    def place(data: bytes, workdir: Path) -> Path:
        path = workdir / f"input{suffix}"
        path.write_bytes(data)
        return path
    return place


def _image_folder(data: bytes, workdir: Path) -> Path:
    """``workdir/images/cls/input.png``; returns the folder ``open_source`` reads."""
    cls = workdir / "images" / "cls"
    cls.mkdir(parents=True, exist_ok=True)
    (cls / "input.png").write_bytes(data)
    return workdir / "images"


def _torch(path: Path):
    return read_state_dict(path)


def _yolov6(path: Path):
    return read_state_dict(path, module_classes=YOLOV6_MODULE_CLASSES)


def _npz_split(path: Path):
    src = open_source(str(path), split="train")
    return src.load(list(range(min(src.num_images, 2))))


def _folder(path: Path):
    src = open_source(str(path), split="val", image_size=IMAGE_SIZE, num_workers=0)
    return src.load([0])


_CKPT, _DATA = (CheckpointError,), (DataError,)
TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("torch_zip", _torch, _CKPT, _file(".pt"), "read_state_dict on torch.save zip files"),
    Target("torch_legacy", _torch, _CKPT, _file(".pt"), "read_state_dict on legacy (pre-1.6) torch pickles"),
    Target("yolov6_release", _yolov6, _CKPT, _file(".pt"),
           "read_state_dict(module_classes=YOLOV6_MODULE_CLASSES) on release-style module pickles"),
    Target("safetensors", load_safetensors, _CKPT, _file(".safetensors"), "load_safetensors"),
    Target("npz_checkpoint", _torch, _CKPT, _file(".npz"), "read_state_dict on .npz weights"),
    Target("npz_split", _npz_split, _DATA, _file(".npz"), "open_source(.npz).load: the CIFAR-style split reader"),
    Target("image_folder", _folder, _DATA, _image_folder,
           "open_source(folder).load: image decoding up to MAX_IMAGE_PIXELS, resize, crop"),
    Target("coco_json", read_instances, _DATA, _file(".json"), "read_instances (COCO instances JSON)"),
)}


def _check_refusal(e: BaseException, path: Path) -> None:
    msg = str(e)
    if "\n" in msg:
        raise Finding(f"{type(e).__name__} message spans {msg.count(chr(10)) + 1} lines") from e
    if "MemoryError" in msg or "out of memory" in msg:
        raise Finding(f"allocation past the memory limit, reported as {type(e).__name__}") from e
    if path.name not in msg and str(path) not in msg:
        raise Finding(f"{type(e).__name__} does not name the file: {msg[:200]}") from e


def _on_alarm(signum, frame):
    raise Hang("input ran past the harness alarm")


def run_one(target: Target, data: bytes, workdir: Path, alarm_s: int = 0) -> bool:
    """Feed ``data`` to ``target``: True if accepted, False if cleanly refused; raises otherwise.
    ``alarm_s > 0`` arms SIGALRM (main thread only) so a hang raises :class:`Hang`."""
    path = target.place(data, workdir)
    if alarm_s:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(alarm_s)
    try:
        target.call(path)
        return True
    except target.refusals as e:
        _check_refusal(e, path)
        return False
    finally:
        if alarm_s:
            signal.alarm(0)


def scratch_dir() -> Path:
    """A fresh temp folder for one fuzzing process (RAM-backed ``/dev/shm`` when present)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="cfws_fuzz_", dir=base))
