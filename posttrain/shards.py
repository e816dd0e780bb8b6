"""Safetensors files written in a stream: shard plans from tensor headers, one tensor written at a time.

The merge (posttrain/merging.py) knows every output tensor's name, dtype and shape before computing any,
so shard boundaries and each file's header are fixed up front and no shard is ever buffered in memory.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

import torch

ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}


def nbytes(st_dtype: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of safetensors dtype `st_dtype` and `shape`."""
    return math.prod(shape) * TORCH_DTYPES[st_dtype].itemsize


def parse_size(size: int | str) -> int:
    """Bytes from 123, '500MB', '2GB' (powers of 10) or '1GiB' (powers of 2)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like 500MB, 2GB, 1GiB")
    unit = (m.group(2) or "B").upper()
    scale = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }[unit]
    return int(float(m.group(1)) * scale)


def plan_shards(specs: list[tuple[str, str, tuple]], max_bytes: int) -> list[list[tuple[str, str, tuple]]]:
    """Split (name, dtype, shape) in order into shards of at most max_bytes (a bigger tensor goes alone)."""
    shards, size = [[]], 0
    for spec in specs:
        n = nbytes(spec[1], spec[2])
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


class ShardWriter:
    """Writes one safetensors file whose header is fixed up front; tensors arrive in planned order."""

    def __init__(self, path: Path, specs: list[tuple[str, str, tuple]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in specs:
            n = nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format aligns the data start to 8 bytes
        self.pending = list(specs)
        self.file = open(path, "wb")
        self.file.write(len(blob).to_bytes(8, "little") + blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dtype, shape = self.pending.pop(0)
        if (name, ST_DTYPES[tensor.dtype], tuple(tensor.shape)) != (want, dtype, tuple(shape)):
            raise RuntimeError(
                f"shard writer expected {want} {dtype} {list(shape)}, got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        self.file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        if not self.pending:
            self.file.close()
