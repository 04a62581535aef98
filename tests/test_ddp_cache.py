"""The target cache under DDP: every process decides from the folder as it was before any of them wrote to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from test_train import tiny, weights  # noqa: F401  (the fixture in test_train is autouse there only)

from phreg.config.recipe import save_recipe

# rank 1 reaches the cache late: rank 0 has long allocated it and written its meta.json by then
LATE_RANK = textwrap.dedent("""
    import os, sys, time
    import phreg.targets.cache as cache
    real = cache.TargetCache.reopen.__func__
    def late(cls, folder, key, say):
        if os.environ.get("RANK") == "1":
            time.sleep(3)
        return real(cls, folder, key, say)
    cache.TargetCache.reopen = classmethod(late)
    from phreg.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_a_late_rank_builds_the_cache_with_the_others(tmp_path, dinov2_file):
    """Without a barrier between reading the cache folder and writing it, a late rank saw the meta.json rank 0 had
    just written, skipped the allocation's barrier, and the two ranks waited on different collectives for ever."""
    recipe = save_recipe(tiny(tmp_path, dinov2_file, "data.val_split=0", "train.max_steps=2", "cache.enabled=true",
                              "cache.plans=2"), tmp_path / "recipe.yaml")
    launched = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--no-python", sys.executable, "-c",
         LATE_RANK, "distill", str(recipe), f"output_dir={tmp_path / 'two'}", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    try:
        _, err = launched.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(launched.pid, signal.SIGKILL)  # the launcher and both ranks
        pytest.fail("the two ranks never finished: they wait on different collectives")
    assert launched.returncode == 0, err[-3000:]
    assert (tmp_path / "two" / "export" / "model.safetensors").is_file()
