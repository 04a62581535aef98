"""Pretrained models, in three steps that each have their module:

- `weights`: where a model's weights come from (a file, the checkpoints folder, a local-dir: / hf-hub: name, timm's
  download), what the Hub cache holds, whether the network answers, and the hashes a card records; no torch;
- `loading`: building the model and loading those weights into it, frozen, at the recipe's resolution;
- `specs`: what a user types on the command line (a timm name, an export folder, a run folder), resolved to a model.

Everything is importable from `phreg.models` as before the split.
"""

from ..preflight import check_img_size
from .loading import (build_model, error_summary, frozen_dtype, load_into_meta, load_teacher, normalization,
                      unknown_model)
from .specs import Loaded, load_run_teacher, load_spec, run_recipe
from .weights import (HUB_FILES, WEIGHT_SUFFIXES, Weights, base_change, checkpoints_dir, find_local_weights,
                      find_weights, hub_cached, offline_reason, quiet_hub, sha256_file)

__all__ = ["HUB_FILES", "WEIGHT_SUFFIXES", "Loaded", "Weights", "base_change", "build_model", "check_img_size",
           "checkpoints_dir", "error_summary", "find_local_weights", "find_weights", "frozen_dtype", "hub_cached",
           "load_into_meta", "load_run_teacher", "load_spec", "load_teacher", "normalization", "offline_reason",
           "quiet_hub", "run_recipe", "sha256_file", "unknown_model"]
