"""phreg.files.tensorfile writes the bytes safetensors writes (sorted metadata), from the tensors' own storage."""

import json
import struct

import safetensors
import safetensors.torch
import torch

from phreg.files import tensorfile
from phreg.files.tensorfile import load_file, save_file

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.uint16, torch.uint32, torch.uint64]


def test_bytes_equal_safetensors_own_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorfile, "CHUNK", 1000)  # staged conversions in many chunks
    tensors = {f"t{i}": torch.randn(37, 11).to(dt) for i, dt in enumerate(DTYPES)}
    tensors |= {"transposed": torch.randn(50, 60).t(), "empty": torch.zeros(0, 3), "scalar": torch.tensor(3.0)}
    plain = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"b": "1", "a": "2", "format": "pt"}
    ref = safetensors.torch.save(plain, meta)
    entry = save_file(tensors, tmp_path / "x.safetensors", meta)
    mine = (tmp_path / "x.safetensors").read_bytes()
    n = struct.unpack("<Q", ref[:8])[0]
    header = json.loads(ref[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))  # safetensors' order is a HashMap's
    assert mine[8 + n:] == ref[8 + n:] and json.loads(mine[8:8 + n]) == header and list(json.loads(mine[8:8 + n])) \
        == ["__metadata__", *[k for k in header if k != "__metadata__"]]
    assert entry["bytes"] == len(mine)
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], plain[k]) for k in plain)
    with safetensors.safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == meta
    save_file({"w": torch.randn(999)}, tmp_path / "bf.safetensors", dtypes={"w": torch.bfloat16})
    assert safetensors.torch.load_file(str(tmp_path / "bf.safetensors"))["w"].dtype == torch.bfloat16
