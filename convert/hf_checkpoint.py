"""Read a Hugging Face checkpoint tensor by tensor: safetensors (single or sharded) and pickled
`pytorch_model*.bin` (read without torch and without running pickled code)."""

from __future__ import annotations

import json
import mmap
import pickle
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import WeightsError

# safetensors dtype -> (numpy dtype to read the bytes as, mlx dtype to view them as)
SAFETENSORS_DTYPES = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
    "F64": (np.float64, mx.float32),
    "I64": (np.int64, mx.int64),
    "I32": (np.int32, mx.int32),
    "U8": (np.uint8, mx.uint8),
    "BOOL": (np.bool_, mx.bool_),
}
# torch storage class name -> (numpy dtype, mlx dtype), for .bin checkpoints
TORCH_DTYPES = {
    "FloatStorage": (np.float32, mx.float32),
    "HalfStorage": (np.float16, mx.float16),
    "BFloat16Storage": (np.uint16, mx.bfloat16),
    "DoubleStorage": (np.float64, mx.float32),
    "LongStorage": (np.int64, mx.int64),
    "IntStorage": (np.int32, mx.int32),
    "ByteStorage": (np.uint8, mx.uint8),
    "BoolStorage": (np.bool_, mx.bool_),
}


def _to_mlx(raw: np.ndarray, mlx_dtype: mx.Dtype) -> mx.array:
    if mlx_dtype == mx.bfloat16:
        return mx.array(raw).view(mx.bfloat16)
    return mx.array(raw).astype(mlx_dtype)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of an HF folder, safetensors preferred over .bin."""
    for pattern in ("model*.safetensors", "*.safetensors", "pytorch_model*.bin"):
        files = sorted(model_dir.glob(pattern))
        if files:
            return files
    raise WeightsError(
        f"{model_dir} has no weights (model*.safetensors or pytorch_model*.bin); "
        "check the folder or the hub id"
    )


def iter_tensors(path: Path) -> Iterator[tuple[str, mx.array]]:
    if path.suffix == ".safetensors":
        yield from _iter_safetensors(path)
    else:
        yield from _iter_torch_bin(path)


def _iter_safetensors(path: Path) -> Iterator[tuple[str, mx.array]]:
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            (n,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8 : 8 + n])
            start, size = 8 + n, len(data)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                np_dtype, mlx_dtype = SAFETENSORS_DTYPES[info["dtype"]]
                lo, hi = (start + o for o in info["data_offsets"])
                if hi > size:
                    raise WeightsError(
                        f"{path} is truncated: tensor {name} ends at byte {hi} of {size}; "
                        "download the file again"
                    )
                raw = np.frombuffer(data[lo:hi], dtype=np_dtype).reshape(info["shape"])
                yield name, _to_mlx(raw, mlx_dtype)
    except (struct.error, ValueError, KeyError, UnicodeDecodeError) as e:
        raise WeightsError(
            f"{path} is not a valid safetensors file ({e}); download the file again"
        ) from e


class _Storage:
    def __init__(self, archive: zipfile.ZipFile, prefix: str, key: str, storage_type: str):
        if storage_type not in TORCH_DTYPES:
            raise WeightsError(f"unsupported torch storage type {storage_type}")
        self.np_dtype, self.mlx_dtype = TORCH_DTYPES[storage_type]
        self.data = np.frombuffer(archive.read(f"{prefix}/data/{key}"), dtype=self.np_dtype)


class _TorchUnpickler(pickle.Unpickler):
    """Rebuilds tensors as numpy views of their storages; refuses every other callable."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in TORCH_DTYPES:
            return name
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint")

    def persistent_load(self, pid: tuple) -> _Storage:
        _, storage_type, key, _location, _numel = pid
        if key not in self.storages:
            self.storages[key] = _Storage(self.archive, self.prefix, key, storage_type)
        return self.storages[key]


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any):
    itemsize = storage.data.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage.data[offset:], shape=size, strides=[s * itemsize for s in stride]
    )
    return _to_mlx(np.ascontiguousarray(view), storage.mlx_dtype)


def _iter_torch_bin(path: Path) -> Iterator[tuple[str, mx.array]]:
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            prefix = pkl[: -len("/data.pkl")]
            with archive.open(pkl) as f:
                state = _TorchUnpickler(f, archive, prefix).load()
    except (zipfile.BadZipFile, StopIteration, EOFError, pickle.UnpicklingError, KeyError) as e:
        raise WeightsError(
            f"{path} is not a readable PyTorch zip checkpoint ({e}); re-download it"
        ) from e
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    yield from state.items()
