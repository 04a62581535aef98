"""Pretrained models, in steps that each have their module:

- `names`: what a user names a model with, checked before torch loads (torch-free);
- `weights`: where a model's weights come from (a file, the checkpoints folder, a local-dir: / hf-hub: name, timm's
  download), what the Hub cache holds, whether the network answers, and the hashes a card records (torch-free);
- `loading`: building the model and loading those weights into it, frozen, at the recipe's resolution;
- `specs`: what a user types on the command line (a timm name, an export folder, a run folder), resolved to a model.
"""
