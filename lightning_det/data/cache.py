"""One copy per machine of a dataset's decoded images (``data.loader.cache=ram|disk``), mapped by every DDP rank and
loader worker.

A per-process cache (Ultralytics' ``cache=ram``) holds a copy in each rank and worker and runs out of memory on
sets that would fit once. Here the decoded ``uint8`` images lie end to end in one file that each process maps
read-only: in ``/dev/shm`` (``ram``: shared memory) or in the cache folder (``disk``: the page cache keeps what is
read often), so the pages exist once however many processes read them.

The file's name says what it holds: a hash of the images' paths, decoded shapes and EXIF handling (which set),
then a hash of their byte sizes and modification times (which version). A changed file gives a new name; the
stale version is deleted when the new one is built. One process builds, holding a lock file, into a temporary
name that it renames when complete, so a killed build never leaves a cache that is used; the others wait for the
lock and map the result. Before building, the size is estimated from the shapes and the build is refused when
it would not fit.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from lightning_det.data.image_checks import framework_cache
from lightning_det.data.records import AnnotationRecord
from lightning_det.io import write_atomically

log = logging.getLogger(__name__)

CACHE_KINDS = ("ram", "disk")  # data.loader.cache values besides null
RAM_FOLDER = Path("/dev/shm/lightning_det")
RAM_SHARE = 0.5  # of the memory available when it is built, a ram cache may take: training needs the rest
DISK_RESERVE_BYTES = 2**30  # free space a disk cache leaves on its file system


def check_kind(kind: str | None) -> None:
    if kind not in (None, *CACHE_KINDS):
        raise ValueError(f"data.loader.cache must be one of {list(CACHE_KINDS)} or null, got {kind!r}")


def cache_folder(kind: str) -> Path:
    """Where caches of ``kind`` live: ``/dev/shm/lightning_det``, or ``images/`` in the framework's cache folder
    (``$LIGHTNING_DET_CACHE``, else ``~/.cache/lightning_det``)."""
    if kind == "ram":
        return RAM_FOLDER
    return framework_cache() / "images"


def image_bytes(shapes: Sequence[tuple[int, int]] | np.ndarray) -> int:
    """Bytes of the decoded ``uint8`` RGB images of these ``(h, w)``: the memory estimate."""
    return int(3 * np.prod(np.asarray(shapes, dtype=np.int64).reshape(-1, 2), axis=1).sum())


class ImageCacheError(RuntimeError):
    """The shared cache cannot be made: it would not fit where it would go, or that place does not exist."""


class SharedImageCache:
    """The decoded images of a list of records, read from one memory-mapped file; picklable (a worker started by
    ``spawn`` maps the file again, a forked one shares the parent's mapping)."""

    def __init__(self, path: Path, shapes: Sequence[tuple[int, int]] | np.ndarray) -> None:
        self.path = path
        self.shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)  # an array: workers share it (records.py)
        self.offsets = np.concatenate(([0], np.cumsum(3 * self.shapes[:, 0] * self.shapes[:, 1])))
        self._pixels: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.shapes)

    def open(self) -> SharedImageCache:
        """Map the file read-only now (done on first use otherwise)."""
        self._pixels = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self

    def __getitem__(self, index: int) -> torch.Tensor:
        """A private, writable ``uint8 [3, H, W]`` copy of image ``index`` (transforms may work in place)."""
        if self._pixels is None:
            self.open()
        height, width = self.shapes[index].tolist()
        flat = self._pixels[self.offsets[index] : self.offsets[index + 1]]
        return torch.from_numpy(flat.reshape(3, height, width).copy())

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}


def shared_image_cache(
    kind: str, records: Sequence[AnnotationRecord], shapes: Sequence[tuple[int, int]] | np.ndarray,
    decode: Callable[[int], torch.Tensor],
) -> SharedImageCache:
    """The cache of ``records`` (image ``i`` decoded by ``decode(i)`` at ``shapes[i]``), built by the first process
    that asks for it while the others wait, or mapped when a complete one of the files' current version exists."""
    check_kind(kind)
    folder = cache_folder(kind)
    if kind == "ram" and not folder.parent.is_dir():
        raise ImageCacheError(f"data.loader.cache=ram needs {folder.parent} (Linux shared memory); use "
                              "data.loader.cache=disk")
    folder.mkdir(parents=True, exist_ok=True)
    which = digest([(record.path, (height, width), record.exif_orientation)
                    for record, (height, width) in zip(records, np.asarray(shapes).tolist())])
    path = folder / f"{which}-{version_of(records)}.u8"
    cache = SharedImageCache(path, shapes)
    if is_complete(path, cache.offsets[-1]):
        return cache.open()
    with open(folder / f"{which}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if not is_complete(path, cache.offsets[-1]):
            # older versions, and the temporaries of builds killed half-way (no other builder runs: the lock)
            for stale in (*folder.glob(f"{which}-*"), *folder.glob(f".{which}-*")):
                stale.unlink(missing_ok=True)
            check_fits(kind, folder, int(cache.offsets[-1]), len(records))
            build(path, len(records), decode)
    return cache.open()  # mapped now: forked workers share this mapping, even if a newer version replaces the file


def digest(items: object) -> str:
    return hashlib.sha256(repr(items).encode()).hexdigest()[:20]


def version_of(records: Sequence[AnnotationRecord]) -> str:
    """Hash of the image files' byte sizes and modification times: changes when any image is replaced."""
    stats = [os.stat(record.path) for record in records]
    return digest([(stat.st_size, stat.st_mtime_ns) for stat in stats])


def is_complete(path: Path, size: int) -> bool:
    """Only a finished build is renamed to ``path``; its size guards against a file cut short by other means."""
    return path.is_file() and path.stat().st_size == size


def available_memory() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes: what can be allocated without swapping."""
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def check_fits(kind: str, folder: Path, size: int, count: int) -> None:
    """Refuse a cache that would not fit: a ram cache in ``RAM_SHARE`` of the available memory (and in the free
    space of ``/dev/shm``), a disk cache in the free space less ``DISK_RESERVE_BYTES``."""
    free = shutil.disk_usage(folder).free
    if kind == "ram":
        memory = available_memory()
        allowed = min(int(RAM_SHARE * memory), free)
        where = (f"{gb(memory)} of memory available (the cache may take {RAM_SHARE:.0%}), {gb(free)} free in "
                 f"{folder.parent}")
        fix = f"data.loader.cache=disk (a memory-mapped file in {cache_folder('disk')}) or data.loader.cache=null"
    else:
        allowed = free - DISK_RESERVE_BYTES
        where = f"{gb(free)} free in {folder} (keeping {gb(DISK_RESERVE_BYTES)})"
        fix = "data.loader.cache=null, or free space there (or set LIGHTNING_DET_CACHE to a larger disk)"
    if size > allowed:
        raise ImageCacheError(f"data.loader.cache={kind} would hold {count} decoded images in {gb(size)}, but there is "
                              f"{where}; use {fix}")


def build(path: Path, count: int, decode: Callable[[int], torch.Tensor]) -> None:
    """Decode every image into the file, written atomically: a killed build leaves only a temporary, which the
    next build removes."""
    log.info(f"caching {count} decoded images in {path} (every rank and worker maps this one file; delete it to "
             "free the space)")
    write_atomically(path, lambda file: file.writelines(
        decode(index).contiguous().numpy().tobytes() for index in range(count)))


def gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"
