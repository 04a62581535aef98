"""benchmarks/gpu_suite.sh on a machine without a GPU: one line, exit 0, nothing written."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    env.pop("PHREG_GPU_SUITE_DRY", None)
    out = tmp_path / "suite.json"
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), str(out)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines() == ["gpu_suite: no CUDA GPU on this machine; nothing measured"]
    assert not out.exists()
