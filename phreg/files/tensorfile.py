"""safetensors files written from, and read into, the tensors' own storage: never a whole-file copy in memory.

`safetensors.torch.save` / `save_file` turn every tensor into a Python `bytes` object and then join them: two full
copies of a model on the host at the moment a checkpoint or an export is written (4.5 GB per timed checkpoint of a
ViT-g). `save_file` here writes the header, then each tensor's bytes through a memoryview of its storage, into a
temporary file that is fsynced and renamed; a GPU tensor (or one converted to another dtype) is staged through the
host in bounded chunks. The bytes are the ones `safetensors.torch.save` writes for the same tensors (same tensor order,
same header JSON, same padding), with the metadata keys sorted so that the same tensors always give the same file;
`safetensors.safe_open` and timm read it as theirs.

`load_file` reads each tensor straight into a tensor of its own (one `readinto`, no memory map whose pages would count
twice while the model is built), optionally converting floating tensors to another dtype one tensor at a time, so a
bf16 model is loaded from an fp32 file with one fp32 tensor in flight, never the fp32 model.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from .atomic import atomic_file, write_all

# safetensors' dtype names, in the order its writer lays tensors out (descending dtype, then name)
DTYPES = {torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.uint32: "U32",
          torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16",
          torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
_RANK = {name: i for i, name in enumerate(DTYPES.values())}
_TORCH = {name: dt for dt, name in DTYPES.items()}
CHUNK = 64 << 20  # bytes staged at once for a GPU tensor or a dtype conversion


def _flat_bytes(t: torch.Tensor) -> memoryview:
    """A CPU contiguous tensor's bytes, as a view of its storage (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _pieces(t: torch.Tensor, dtype: torch.dtype):
    """`t` as `dtype` on the host, in pieces of at most CHUNK bytes, each a memoryview: the storage itself when `t`
    is already a contiguous CPU tensor of that dtype, else staged (moved / converted) chunk by chunk."""
    t = t.detach()
    if t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous():
        yield _flat_bytes(t)
        return
    if not t.is_contiguous():
        t = t.contiguous()  # one tensor at a time (a transposed view; never seen for model weights)
    flat = t.reshape(-1)
    step = max(1, CHUNK // max(t.element_size(), torch.empty((), dtype=dtype).element_size()))
    for start in range(0, flat.numel(), step):
        yield _flat_bytes(flat[start:start + step].to("cpu", dtype))


def header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
           dtypes: dict[str, torch.dtype] | None = None) -> tuple[bytes, list[str]]:
    """The header safetensors writes for `tensors` (as `dtypes[name]` where given), padded to 8 bytes, and the names in
    the order their bytes follow it."""
    dtypes = dtypes or {}
    dt = {k: dtypes.get(k, v.dtype) for k, v in tensors.items()}
    order = sorted(tensors, key=lambda k: (_RANK[DTYPES[dt[k]]], k))
    head: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for k in order:
        n = tensors[k].numel() * torch.empty((), dtype=dt[k]).element_size()
        head[k] = {"dtype": DTYPES[dt[k]], "shape": list(tensors[k].shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None,
              dtypes: dict[str, torch.dtype] | None = None) -> dict:
    """Write `tensors` to `path` (temporary file, fsync, rename); returns its manifest entry {bytes, sha256}, the hash
    taken from the bytes as they are written. `dtypes`: tensors to write converted (e.g. float32 for an export)."""
    path = Path(path)
    head, order = header(tensors, metadata, dtypes)
    digest, size = hashlib.sha256(head), len(head)
    with atomic_file(path) as f:
        write_all(f, head)
        for k in order:
            for piece in _pieces(tensors[k], (dtypes or {}).get(k, tensors[k].dtype)):
                digest.update(piece)
                size += len(piece)
                write_all(f, piece)
    return dict(bytes=size, sha256=digest.hexdigest())


def read_header(path: str | Path) -> tuple[dict, int]:
    """(the header's JSON, the offset where tensor data starts); ValueError for a file that is not safetensors."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20 or n > os.fstat(f.fileno()).st_size - 8:
            raise ValueError(f"{path} is not a safetensors file (header of {n} bytes)")
        head = json.loads(f.read(n))
    if not isinstance(head, dict):
        raise ValueError(f"{path} is not a safetensors file")
    return head, 8 + n


def load_file(path: str | Path, names=None, dtype: torch.dtype | None = None,
              ndim: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (only `names` when given), each read into its own storage; floating tensors
    (those of `ndim` dimensions, when given) converted to `dtype` when given, one at a time. ValueError for a file that is
    not safetensors or is truncated."""
    head, start = read_header(path)
    head.pop("__metadata__", None)
    want = head if names is None else {k: head[k] for k in names if k in head}
    out = {}
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        for k, spec in sorted(want.items(), key=lambda kv: kv[1]["data_offsets"][0]):  # in file order
            try:
                t = torch.empty(spec["shape"], dtype=_TORCH[spec["dtype"]])
                begin, end = spec["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: {k} has an unreadable entry in the header") from None
            if end - begin != t.numel() * t.element_size() or start + end > size:
                raise ValueError(f"{path}: {k} lies outside the file (truncated?)")
            f.seek(start + begin)
            view = _flat_bytes(t)
            while view:
                got = f.readinto(view)
                if not got:
                    raise ValueError(f"{path}: {k} is cut short (truncated?)")
                view = view[got:]
            convert = dtype is not None and t.is_floating_point() and t.dtype != dtype and ndim in (None, t.ndim)
            out[k] = t.to(dtype) if convert else t
    return out
