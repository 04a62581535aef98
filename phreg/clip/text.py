"""CLIP's text tower, kept beside a distilled image tower so the student can do zero-shot segmentation.

Built and tokenized by open_clip_torch (its BPE vocabulary ships inside the package: no network for CLIP-BPE models).
Sources, in order: a saved text tower (`open_clip_text.safetensors`: open_clip's own state-dict keys minus
`visual.*`, with the open_clip model name in its header), a whole CLIP checkpoint (`model.checkpoint`: OpenAI or
open_clip layout, safetensors or `.pt`/`.bin` read with `weights_only=True` by open_clip's loader), or an open_clip
pretrained tag (`model.text_pretrained`, downloaded into the Hugging Face cache like any open_clip model).

Without phreg, the saved file loads in three lines of open_clip (see docs/clip.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from ..run.folder import TEXT_FILE  # noqa: F401  (the run folder's layout names it)

TEXT_KEYS = ("token_embedding.weight", "text.token_embedding.weight", "text.transformer.embeddings.word_embeddings.weight")


def checkpoint_keys(path: str | Path) -> list[str]:
    """Tensor names of a weights file without reading the tensors (safetensors header; a pickle is mmap-read)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a foreign or truncated file: safetensors / torch raise many types
        raise UsageError(f"{path} is not a readable weights file: {type(e).__name__}: {str(e)[:200]}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return list(state)


def is_whole_clip(path: str | Path) -> bool:
    """A whole CLIP (image and text towers), as OpenAI and open_clip save it."""
    keys = set(checkpoint_keys(path))
    return any(k in keys or f"module.{k}" in keys for k in TEXT_KEYS)


class TextTower(torch.nn.Module):
    """open_clip's text encoder (its CLIP model without the image tower) and tokenizer."""

    def __init__(self, clip: torch.nn.Module, name: str):
        super().__init__()
        import open_clip

        clip.visual = None  # the image tower is timm's; the text path never touches it
        self.clip, self.name = clip.eval().requires_grad_(False), name
        self.tokenizer = open_clip.get_tokenizer(name)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """(n, D) L2-normalized text embeddings."""
        device = next(self.clip.parameters()).device
        out = [self.clip.encode_text(self.tokenizer(texts[i:i + batch_size]).to(device), normalize=True)
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out).float()

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().contiguous() for k, v in self.clip.state_dict().items()}

    def save(self, path: str | Path) -> Path:
        """One safetensors file, open_clip's keys; the model name in the header says how to rebuild it."""
        import safetensors.torch

        from ..files.atomic import write_atomic

        data = safetensors.torch.save(self.state(), metadata={"format": "pt", "open_clip_model": self.name})
        return write_atomic(path, data)


def _create(name: str, pretrained: str | None):
    import open_clip

    from ..models.weights import quiet_hub

    if name not in open_clip.list_models():
        raise UsageError(f"model.text_model {name!r} is not an open_clip model (see open_clip.list_models())")
    if pretrained and not Path(pretrained).is_file():  # a tag: its weights come from the cache or the Hub
        pretrained = _cached_or_reachable(name, pretrained)
    try:
        with quiet_hub():
            return open_clip.create_model(name, pretrained=pretrained, weights_only=True)
    except Exception as e:  # a mismatching checkpoint, no network for a tag, ...: open_clip raises many types
        what = f"open_clip {name} with weights {pretrained}" if pretrained else f"open_clip {name}"
        raise UsageError(f"could not build {what}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None


def _cached_or_reachable(name: str, tag: str) -> str:
    """The cached weights file of open_clip `name`/`tag`, or the tag itself when the Hub can be reached; offline and
    not cached: one line at once, instead of the hub client's retries."""
    import open_clip

    from ..models.weights import HUB_FILES, hub_cached, offline_reason

    repo = (open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub", "").strip("/")
    found = hub_cached(repo, ("open_clip_model.safetensors", *HUB_FILES)) if repo else None
    if found is not None:
        return str(found)
    reason = offline_reason()
    if reason:
        raise UsageError(f"no weights for the text tower {name} ({tag}) ({reason}, nothing cached): pass a whole "
                         "CLIP checkpoint as model.checkpoint (eval and segment also take a saved text tower: --text)")
    return tag


def load_saved(path: str | Path, name: str | None = None) -> TextTower:
    """A text tower saved by `TextTower.save` (or any open_clip state dict holding a text tower)."""
    import safetensors
    import safetensors.torch

    path = Path(path)
    with safetensors.safe_open(str(path), "pt") as f:
        name = name or (f.metadata() or {}).get("open_clip_model")
    if not name:
        raise UsageError(f"{path} does not name its open_clip model (header key open_clip_model); pass it")
    clip = _create(name, None)
    missing, unexpected = clip.load_state_dict(safetensors.torch.load_file(str(path)), strict=False)
    missing = [k for k in missing if not k.startswith("visual.")]
    if missing or unexpected:
        raise UsageError(f"{path} does not fit open_clip {name}: "
                         f"{'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]}")
    return TextTower(clip, name)


def load_text_tower(cfg) -> TextTower:
    """The text tower a recipe's model section names (`model.text_model`, from `model.checkpoint` when it is a
    whole CLIP, else `model.text_pretrained`)."""
    if not cfg.text_model:
        raise UsageError(f"{cfg.name} has no text tower: set model.text_model (an open_clip model name)")
    if cfg.checkpoint and is_whole_clip(cfg.checkpoint):
        return TextTower(_create(cfg.text_model, str(cfg.checkpoint)), cfg.text_model)
    if cfg.text_pretrained:
        return TextTower(_create(cfg.text_model, cfg.text_pretrained), cfg.text_model)
    raise UsageError(f"no text tower for {cfg.name}: model.checkpoint is not a whole CLIP and "
                     "model.text_pretrained is not set")


def find_saved(spec: str) -> Path | None:
    """The text tower shipped with a model: in a run folder, its export, or a hub repo (`hf-hub:OWNER/NAME`)."""
    if spec.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(spec.removeprefix("hf-hub:").split("@")[0], TEXT_FILE))
        except Exception:  # no such file, offline, ...: the caller says what is missing
            return None
    path = Path(spec.removeprefix("local-dir:"))
    for candidate in (path / TEXT_FILE, path / "export" / TEXT_FILE):
        if candidate.is_file():
            return candidate
    return None


def text_tower_for(spec: str, text: str | None = None, text_model: str | None = None,
                   run: Path | None = None) -> TextTower:
    """The text tower for zero-shot with model `spec`: `--text FILE` (a saved text tower, or a whole CLIP with
    `--text-model NAME`), else the one shipped with the model (run, export or hub folder), else the run's recipe."""
    if text:
        if not Path(text).is_file():
            raise UsageError(f"--text {text} not found")
        keys = checkpoint_keys(text)
        if not any(k.removeprefix("module.") in TEXT_KEYS for k in keys):
            raise UsageError(f"--text {text} holds no CLIP text tower")
        if not any(k.removeprefix("module.").startswith("visual.") for k in keys):
            return load_saved(text, text_model)
        if not text_model:
            raise UsageError(f"--text {text} is a whole CLIP checkpoint: name its open_clip model with --text-model")
        return TextTower(_create(text_model, str(text)), text_model)
    found = find_saved(spec) or (find_saved(str(run)) if run else None)
    if found is not None:
        return load_saved(found, text_model)
    if run is not None:
        from ..config.recipe import load_recipe

        return load_text_tower(load_recipe(run / "recipe.yaml").model)
    raise UsageError(f"no text tower for {spec}: pass --text FILE (a saved {TEXT_FILE}, or a whole CLIP checkpoint "
                     "with --text-model NAME)")
