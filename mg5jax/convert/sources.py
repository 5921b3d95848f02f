"""Tensor sources on disk: safetensors (single or sharded) and torch pickles, read one tensor at a time.

A source is a read-only mapping from a checkpoint key to a numpy array that also says which file
a key lives in, so conversion errors can name it. Tensors are memory-mapped and converted one at a
time, so a 7B model never needs twice its size in host RAM.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import pathlib
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_DTYPE_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


log = logging.getLogger(__name__)

_UMASK = os.umask(0o022)  # read (and restored) once, at import: setting it is process-wide
os.umask(_UMASK)
TEMPORARY_PREFIX = ".tensors."  # temporary files of the weight writers (swept by `_remove_stale`)


def _temporary(directory: pathlib.Path, prefix: str = TEMPORARY_PREFIX) -> tuple[int, pathlib.Path]:
    """A new temporary file in `directory` (its descriptor and path), with the permissions a plain file
    gets (umask), not mkstemp's owner-only ones: it is renamed into place for others to read."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    os.chmod(name, 0o666 & ~_UMASK)
    return fd, pathlib.Path(name)


def write_atomically(path: str | os.PathLike, data: bytes | str, prefix: str = TEMPORARY_PREFIX) -> None:
    """Write `path` through a temporary file renamed into place: a reader sees the old content or the new."""
    path = pathlib.Path(path)
    fd, tmp = _temporary(path.parent, prefix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class CheckpointError(ValueError):
    """A checkpoint on disk does not match what the model expects (names the key and the file)."""


class TensorSource(Mapping):
    """Read-only `key -> np.ndarray` over one or more files; `where(key)` names the file."""

    def where(self, key: str) -> str:
        raise KeyError(key)

    @property
    def description(self) -> str:
        return type(self).__name__


LFS_POINTER = b"version https://git-lfs"  # how a git-lfs pointer file begins


def check_not_lfs_pointer(path: str | os.PathLike) -> None:
    """Refuse a git-lfs pointer in place of a file (a clone made without git-lfs holds these short text
    stubs instead of the weights and tokenizer files), naming it. A missing or unreadable file passes:
    its loader names it."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(LFS_POINTER))
    except OSError:
        return
    if head == LFS_POINTER:
        raise CheckpointError(f"{path} is a git-lfs pointer, not the file itself: fetch it (`git lfs pull` in the "
                              "repository it was cloned from)")


class SafetensorsFile:
    """One .safetensors file: header parsed eagerly, tensors memory-mapped lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        check_not_lfs_pointer(self.path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if 8 + n > size:
                    raise CheckpointError(f"{self.path}: not a safetensors file (its header would take {n} bytes of "
                                          f"a {size}-byte file)")
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self._offset = 8 + n
        self._mmap: mmap.mmap | None = None

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, key: str) -> np.ndarray:
        info = self.header[key]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: key {key!r} has unsupported dtype {info['dtype']}")
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        start, end = info["data_offsets"]
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end - start != count * dtype.itemsize or self._offset + end > len(self._mmap):
            raise CheckpointError(f"{self.path}: key {key!r} is truncated or corrupt")
        arr = np.frombuffer(self._mmap, dtype=dtype, count=count, offset=self._offset + start)
        return arr.reshape(info["shape"])


class SafetensorsSource(TensorSource):
    """The union of several safetensors files (a sharded checkpoint, or one file)."""

    def __init__(self, files: Iterable[str | os.PathLike]):
        self._files = [SafetensorsFile(f) for f in files]
        self._index: dict[str, SafetensorsFile] = {}
        for f in self._files:
            for k in f.keys():
                if k in self._index:
                    raise CheckpointError(f"key {k!r} appears in both {self._index[k].path} and {f.path}")
                self._index[k] = f

    def __getitem__(self, key: str) -> np.ndarray:
        return self._index[key].get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key) -> bool:  # without reading the tensor, as Mapping's would
        return key in self._index

    def where(self, key: str) -> str:
        return self._index[key].path if key in self._index else self.description

    @property
    def description(self) -> str:
        return ", ".join(f.path for f in self._files)


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def check_torch_file(path: str | os.PathLike, where: str | None = None) -> None:
    """Refuse a file that is not a torch checkpoint by its first bytes (a zip archive, or the pickle of
    the pre-1.6 format), before anything loads it; `where` names the setting that gave it."""
    prefix = f"{where}: " if where else ""
    try:
        check_not_lfs_pointer(path)
    except CheckpointError as e:
        raise CheckpointError(f"{prefix}{e}") from None
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{prefix}cannot read {path} ({e.strerror})") from e
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(f"{prefix}{path} is not a torch checkpoint (neither a zip archive nor a pickle)")


def error_summary(error: Exception) -> str:
    """`Kind: first line` of `error`'s message, terminal colour codes removed (libraries go on for lines,
    with advice that is not ours to give)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _torch_load_problem(path: str, error: Exception, subkey: str | None) -> str:
    """What `torch.load(path, weights_only=True)` failing with `error` means. Not torch's own advice
    (weights_only=False, which would run the file's code), but what the file holds besides tensors and how
    to keep only them; else the first line of its message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsupported:
        keep = (f"{{'{subkey}': c['{subkey}']}}" if subkey else
                "{k: v for k, v in c.items() if isinstance(v, torch.Tensor)}")
        file = pathlib.Path(path)
        out = file.with_name(f"{file.stem}.tensors{file.suffix}")  # keeps the suffix that says what it is
        return (f"{path}: holds an object of type {unsupported.group(1)} besides its tensors, and weights are read "
                "without running a file's code. If you trust the file, save its tensors alone: python -c "
                f"\"import torch; c = torch.load('{path}', weights_only=False); torch.save({keep}, '{out}')\", "
                "then use that file in its place")
    return f"{path}: not a readable torch checkpoint ({error_summary(error)})"


class TorchSource(TensorSource):
    """A torch pickle (`.bin`, `.pth`, `.ckpt`), optionally nested (`['model']`, `['state_dict']`)."""

    def __init__(self, files: Iterable[str | os.PathLike], subkey: str | None = None):
        try:
            import torch
        except ImportError as e:  # torch is only needed for pickled checkpoints
            raise CheckpointError("reading torch pickles needs PyTorch: pip install torch") from e
        self._tensors: dict[str, object] = {}
        self._where: dict[str, str] = {}
        self.paths = [str(f) for f in files]
        for path in self.paths:
            check_torch_file(path)
            try:
                try:
                    obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                except RuntimeError as e:  # the pre-1.6 format cannot be memory-mapped: read it whole
                    if "_use_new_zipfile_serialization" not in str(e):
                        raise
                    obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
                raise CheckpointError(_torch_load_problem(path, e, subkey)) from e
            if subkey is not None:
                if not isinstance(obj, Mapping) or subkey not in obj:
                    found = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
                    raise CheckpointError(f"{path}: expected a dict with key {subkey!r}, found {found}")
                obj = obj[subkey]
            for k, v in obj.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if k in self._tensors:
                    raise CheckpointError(f"key {k!r} appears in both {self._where[k]} and {path}")
                self._tensors[k] = v
                self._where[k] = path

    def __getitem__(self, key: str) -> np.ndarray:
        return _torch_to_numpy(self._tensors[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key) -> bool:
        return key in self._tensors

    def where(self, key: str) -> str:
        return self._where.get(key, self.description)

    @property
    def description(self) -> str:
        return ", ".join(self.paths)


class DictSource(TensorSource):
    """An in-memory `key -> array` mapping (tests, already-loaded state dicts)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], name: str = "<memory>"):
        self._tensors = dict(tensors)
        self.name = name

    def __getitem__(self, key: str) -> np.ndarray:
        value = self._tensors[key]
        if type(value).__module__.startswith("torch"):  # a loaded torch state dict (bf16 included)
            return _torch_to_numpy(value)
        return np.asarray(value)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def where(self, key: str) -> str:
        return self.name

    @property
    def description(self) -> str:
        return self.name


WEIGHT_STEMS = ("model", "diffusion_pytorch_model")


def open_weights(directory: str | os.PathLike, stems: Iterable[str] = WEIGHT_STEMS) -> TensorSource:
    """Open the weights of a hub-layout directory: `<stem>.safetensors`, a sharded
    `<stem>.safetensors.index.json`, `pytorch_model.bin` or its sharded index."""
    d = pathlib.Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"weights directory not found: {d}")
    for stem in stems:
        if (d / f"{stem}.safetensors").is_file():
            return SafetensorsSource([d / f"{stem}.safetensors"])
        index = d / f"{stem}.safetensors.index.json"
        if index.is_file():
            return _checked(index, SafetensorsSource)
    for stem in ("pytorch_model", *stems):
        if (d / f"{stem}.bin").is_file():
            return TorchSource([d / f"{stem}.bin"])
        index = d / f"{stem}.bin.index.json"
        if index.is_file():
            return _checked(index, TorchSource)
    names = [f"{stem}.safetensors" for stem in stems] + [f"{stem}.bin" for stem in ("pytorch_model", *stems)]
    variants = sorted(p.name for p in d.glob("*.*.safetensors")) + sorted(p.name for p in d.glob("*.*.bin"))
    raise FileNotFoundError(
        f"no weights in {d}: expected one of {names} or a sharded *.index.json"
        + (f"; it holds only variant files {variants[:4]}, which are not read (give the directory the full-precision "
           "weights, or rename the variant to the plain name: it is cast to the configured dtype)" if variants else "")
    )


def _checked(index: pathlib.Path, kind) -> TensorSource:
    """The shards a weight index lists, opened as one source. A key the index places in one shard but
    another holds is an error naming both (index and shards disagree: e.g. an interrupted save); a
    listed key no shard holds is a warning (the loader fails on it only if it needs it)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: not a valid weight index ({e})") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: its weight_map lists no tensors")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise CheckpointError(f"{index}: lists shard(s) that do not exist: {missing}")
    source = kind([index.parent / f for f in files])
    for key, name in weight_map.items():
        if key not in source:
            log.warning("%s: lists key %r in %s, but no shard holds it", index, key, name)
        elif source.where(key) != str(index.parent / name):
            raise CheckpointError(f"{index}: places key {key!r} in {name}, but it is in {source.where(key)}")
    return source


class _FileWriter:
    """One .safetensors file written a tensor at a time: the data goes to a temporary file as each tensor
    comes; `finish` puts the header (which precedes the data) and the data into another temporary
    file, named so that `_remove_stale` sweeps it if the process dies, for the caller to rename."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        self.header: dict = {"__metadata__": {"format": "pt"}}
        self.size = 0
        fd, self.data_path = _temporary(directory)
        self._data = os.fdopen(fd, "wb")

    def add(self, key: str, a: np.ndarray, where: str) -> None:
        if key in self.header:
            raise CheckpointError(f"{where}: key {key!r} given twice")
        if a.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"{where}: cannot store key {key!r} with dtype {a.dtype}")
        self.header[key] = {"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                            "data_offsets": [self.size, self.size + a.nbytes]}
        self._data.write(a.reshape(-1).view(np.uint8).data)  # no copy of the tensor
        self.size += a.nbytes

    def finish(self) -> pathlib.Path:
        """The whole file (header + data) under a temporary name; the data file is gone."""
        self._data.close()
        blob = json.dumps(self.header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        fd, name = _temporary(self.directory)
        try:
            with os.fdopen(fd, "wb") as f, open(self.data_path, "rb") as data:
                f.write(struct.pack("<Q", len(blob)))
                f.write(blob)
                shutil.copyfileobj(data, f, 64 << 20)
        except BaseException:
            name.unlink(missing_ok=True)
            raise
        finally:
            self.data_path.unlink(missing_ok=True)
        return name

    def discard(self) -> None:
        try:
            self._data.close()  # after a failed write (a full disk) the flush fails too: the error is raised already
        except OSError:
            pass
        finally:
            self.data_path.unlink(missing_ok=True)


def _items(tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]):
    return tensors.items() if isinstance(tensors, Mapping) else tensors


def write_safetensors(path: str | os.PathLike,
                      tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]) -> None:
    """Write one .safetensors file (any numpy dtype including ml_dtypes.bfloat16) from a mapping or from
    `(key, array)` pairs, which are consumed one at a time; a reader sees the old file or the new one."""
    path = pathlib.Path(path)
    writer = _FileWriter(path.parent)
    try:
        for k, v in _items(tensors):
            writer.add(k, np.require(v, requirements="C"), str(path))  # a 0-d array stays 0-d
        done = writer.finish()
        try:
            os.replace(done, path)
        except BaseException:
            done.unlink(missing_ok=True)
            raise
    finally:
        writer.discard()


def write_sharded_safetensors(directory: str | os.PathLike,
                              tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                              stem: str = "model", max_shard_bytes: int | None = None) -> list[str]:
    """Write `<stem>.safetensors`, or shards of at most `max_shard_bytes` plus
    `<stem>.safetensors.index.json` as the hub does. `(key, array)` pairs are consumed one at a time, so
    a model exported tensor by tensor never sits in host memory whole (nor on disk twice: each shard is
    finished when it fills). The files take their names only once all are written, so a save that fails
    before (in the export or the writing) leaves an earlier one as it was; one interrupted while renaming
    leaves no index rather than a mix. Then the `<stem>` weight files of an earlier save that are not
    part of the new one are removed (a loader would pick a stale single file before the new index)."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    finished: list[tuple[pathlib.Path, dict, int]] = []  # (temporary file, header, bytes)
    writer: _FileWriter | None = None
    keys: set[str] = set()
    try:
        for k, v in _items(tensors):
            a = np.require(v, requirements="C")
            if writer is not None and max_shard_bytes is not None and writer.size \
                    and writer.size + a.nbytes > max_shard_bytes:
                finished.append((writer.finish(), writer.header, writer.size))
                writer = None
            if writer is None:
                writer = _FileWriter(d)
            if k in keys:
                raise CheckpointError(f"{d}: key {k!r} given twice")
            keys.add(k)
            writer.add(k, a, str(d))
        if writer is not None or not finished:
            writer = writer or _FileWriter(d)
            finished.append((writer.finish(), writer.header, writer.size))
            writer = None
        index_path = d / f"{stem}.safetensors.index.json"
        if len(finished) == 1:
            names = [f"{stem}.safetensors"]
        else:
            names = [f"{stem}-{i + 1:05d}-of-{len(finished):05d}.safetensors" for i in range(len(finished))]
            # the index is the commit point: an earlier one goes before its shards may be overwritten, so
            # an interruption leaves no index (a loud error), never one over a mix of old and new shards
            index_path.unlink(missing_ok=True)
        for name, (tmp, _, _) in zip(names, finished):
            os.replace(tmp, d / name)
    finally:
        if writer is not None:
            writer.discard()
        for tmp, _, _ in finished:
            tmp.unlink(missing_ok=True)
    keep = set(names)
    if len(names) > 1:
        weight_map = {k: name for name, (_, header, _) in zip(names, finished) for k in header if k != "__metadata__"}
        index = {"metadata": {"total_size": sum(size for _, _, size in finished)}, "weight_map": weight_map}
        write_atomically(d / f"{stem}.safetensors.index.json", json.dumps(index, indent=2))
        keep.add(f"{stem}.safetensors.index.json")
    _remove_stale(d, stem, keep=keep)
    return names


def _remove_stale(directory: pathlib.Path, stem: str, keep: set[str]) -> None:
    """Remove an earlier save's `<stem>` weight files not in `keep`, and temporary files that a killed
    save left a day ago or more (a save still running keeps its newer ones)."""
    pattern = re.compile(rf"{re.escape(stem)}(-\d+-of-\d+)?\.safetensors(\.index\.json)?")
    for p in directory.iterdir():
        if p.name not in keep and pattern.fullmatch(p.name):
            p.unlink()
        elif p.name.startswith(TEMPORARY_PREFIX) and p.name.endswith(".tmp"):
            try:
                if time.time() - p.stat().st_mtime > 86400:
                    p.unlink()
            except FileNotFoundError:
                continue
