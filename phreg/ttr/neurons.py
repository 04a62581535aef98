"""Register neurons (Jiang et al., 2025): the few MLP units that write a model's outlier tokens, found from images.

A ViT's artifact tokens are not made everywhere in the network: a sparse set of MLP hidden units in one or a few
early-to-middle blocks fires at a handful of positions and writes one large vector into the residual stream there,
which later blocks carry to the output. The search, from a few unlabeled images in batched forwards:

1. outlier positions: patch tokens of a detection block's output (the last block, pre-norm, by default) whose norm
   is more than `ratio` x their image's median patch norm, **or less than 1/`ratio` of it** (`tails="both"`). The
   low tail matters: CLIP-like models show artifacts with *low* norms in the last block (PH-Reg, Fig. 6), and a
   high-tail rule alone reports such a model clean. Clean DINOv2-S stays within 0.7-1.6x its median, so the default
   ratio 2 leaves it without outliers, and the finder then reports no neurons rather than invent some.
2. where they appear: the first block whose output already separates those positions by the same ratio. The units
   that write them sit in that block's MLP or before it, so only blocks up to it are searched (the authors pick this
   bound by hand: block 5 of 12 for OpenCLIP-B, 17 of 24 for DINOv2-L).
3. ranking: every hidden unit of the searched MLPs (the input of `mlp.fc2`: timm's Mlp, GluMlp and SwiGLU alike) by
   its mean |activation| at the outlier positions minus its mean elsewhere (magnitudes, as the authors rank: a gated
   unit may write with either sign). A candidate must stand out from its own
   spread elsewhere by `min_separation` standard deviations (the authors' sparsity filter, in units of the unit).
4. top-k: the gap rule keeps the leading candidates before the largest relative drop in score (one or a few units
   write the outliers; the next ones only correlate with them), all of them (at most `max_k`) when no drop is 2x
   or more, or exactly `top_k` when given (the authors' manual choice).

The authors rank by mean |activation| at the outliers of a fixed absolute norm threshold (30 for CLIP-B, 150 for
DINOv2-L) and choose the top-k and the highest block by eye; the rules above make those choices from the data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ..errors import UsageError

TAILS = ("both", "high", "low")


@dataclass(frozen=True)
class Neuron:
    """One register neuron: hidden unit `index` of `blocks[layer].mlp`, and how it behaves at the outliers."""
    layer: int
    index: int
    at_outliers: float  # mean |activation| at the outlier positions
    elsewhere: float  # mean |activation| at every other patch token
    separation: float  # (at_outliers - elsewhere) / the standard deviation of |activation| elsewhere
    share: float  # fraction of the outlier positions where it fires (|activation| that many deviations up)


@dataclass
class RegisterNeurons:
    """What `find_register_neurons` found: the neurons (maybe none) and the evidence behind them."""
    neurons: list[Neuron]
    coverage: float  # fraction of the outlier positions where at least one kept neuron fires
    outliers: dict  # the outlier rule and what it found: layer, ratio, tails, tokens, fraction, high, low, images
    appear: int | None  # first block whose output separates the outlier positions (None: no outliers)
    searched: list[int] = field(default_factory=list)  # blocks whose MLP units were ranked
    images: int = 0

    def __bool__(self) -> bool:
        return bool(self.neurons)

    def by_layer(self) -> dict[int, list[int]]:
        """layer -> unit indices, the form `add_test_time_registers` and the sidecar take."""
        out: dict[int, list[int]] = {}
        for n in self.neurons:
            out.setdefault(n.layer, []).append(n.index)
        return out

    def to_dict(self) -> dict:
        return dict(neurons=[asdict(n) for n in self.neurons], coverage=self.coverage, outliers=self.outliers,
                    appear=self.appear, searched=self.searched, images=self.images)

    @classmethod
    def from_dict(cls, d: dict) -> "RegisterNeurons":
        return cls([Neuron(**n) for n in d["neurons"]], d["coverage"], d["outliers"], d["appear"], d["searched"],
                   d.get("images", 0))

    def table(self) -> str:
        """A plain-text table, one neuron a line (what `inspect --neurons` will print)."""
        if not self.neurons:
            o = self.outliers
            return (f"no register neurons: {o['tokens']} outlier tokens (norm beyond {o['ratio']:g}x the image median, "
                    f"{o['tails']} tail{'s' if o['tails'] == 'both' else ''}) at block {o['layer']} "
                    f"in {self.images} images")
        lines = [f"{'block':>5} {'unit':>6} {'at outliers':>12} {'elsewhere':>10} {'sep (sd)':>9} {'share':>6}"]
        lines += [f"{n.layer:>5} {n.index:>6} {n.at_outliers:>12.3f} {n.elsewhere:>10.3f} {n.separation:>9.1f} "
                  f"{n.share:>6.1%}" for n in self.neurons]
        lines.append(f"{len(self.neurons)} neurons account for {self.coverage:.1%} of "
                     f"{self.outliers['tokens']} outlier tokens")
        return "\n".join(lines)


def outlier_mask(norms: torch.Tensor, ratio: float = 2.0, tails: str = "both") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) patch-token norms -> (high, low) boolean masks: beyond `ratio` x / below 1/`ratio` of the image median.

    Per image and relative to its own median, so the rule needs no per-model constant (Darcet et al.'s 150 holds for
    DINOv2-L/g only) and works one batch at a time. `tails` "high" or "low" switches the other mask off."""
    if tails not in TAILS:
        raise UsageError(f"tails={tails!r}: expected one of {', '.join(TAILS)}")
    if not ratio > 1:
        raise UsageError(f"ratio={ratio}: an outlier ratio must be above 1")
    r = norms.float() / norms.float().median(1, keepdim=True).values.clamp(min=1e-12)
    high = r > ratio if tails != "low" else torch.zeros_like(r, dtype=torch.bool)
    low = r < 1 / ratio if tails != "high" else torch.zeros_like(r, dtype=torch.bool)
    return high, low


@torch.no_grad()
def find_register_neurons(model: torch.nn.Module, images: torch.Tensor, *, layer: int = -1, ratio: float = 2.0,
                          tails: str = "both", blocks: list[int] | None = None, top_k: int | None = None,
                          max_k: int = 64, min_separation: float = 4.0, chunk: int = 8) -> RegisterNeurons:
    """The register neurons of a timm ViT (`VisionTransformer`, `Eva`) from a few unlabeled images.

    images: normalized (B, 3, H, W) at the model's input size. layer: the block whose pre-norm output decides the
    outliers (default: the last). ratio, tails: the outlier rule (`outlier_mask`). blocks: which MLPs to search
    (default: those up to the block where the outliers appear). top_k: keep exactly that many (default: the gap
    rule, at most `max_k`). min_separation: how many standard deviations (elsewhere) a unit's mean at the outliers
    must stand above its mean elsewhere, and the per-token test for "fires" in `share` and `coverage`.

    One forward per `chunk` images, up to the detection block only (`stop_early`): the hidden activations of the
    searched MLPs are held for one chunk, reduced to sums elsewhere, and kept only at the (few) outlier tokens.
    """
    det, candidates = _search_blocks(model, images, layer, blocks)
    outlier_mask(images.new_ones(1, 1), ratio, tails)  # validates ratio and tails before any work
    stats = _activation_stats(model, images, det, candidates, ratio, tails, chunk)
    tokens = stats.n_high + stats.n_low
    outliers = dict(layer=det, ratio=ratio, tails=tails, tokens=tokens,
                    fraction=tokens / max(1, tokens + stats.n_else), high=stats.n_high, low=stats.n_low,
                    rule=f"patch-token norm at the output of block {det} (pre-norm) "
                         + dict(both=f"above {ratio:g}x or below 1/{ratio:g} of", high=f"above {ratio:g}x",
                                low=f"below 1/{ratio:g} of")[tails] + " its image's median")
    if tokens == 0:
        return RegisterNeurons([], 0.0, outliers, None, [], len(images))
    sep = torch.cat(stats.log_ratio, 1).median(1).values  # per block, the typical outlier's distance from the median
    passed = (sep >= math.log(ratio)).nonzero().flatten()
    appear = int(passed[0]) if len(passed) else det
    searched = [b for b in candidates if b <= appear] if blocks is None else candidates
    neurons, coverage = _rank(stats, searched, top_k, max_k, min_separation)
    return RegisterNeurons(neurons, coverage, outliers, appear, searched, len(images))


def _search_blocks(model, images, layer: int, blocks: list[int] | None) -> tuple[int, list[int]]:
    """The detection block and the blocks whose MLPs are searched, checked against the model."""
    depth = len(model.blocks)
    if not -depth <= layer < depth:
        raise UsageError(f"layer={layer}: the model has blocks 0..{depth - 1}")
    if not len(images):
        raise UsageError("find_register_neurons needs at least one image")
    det = layer % depth
    if blocks is not None and any(not -depth <= b < depth or b % depth > det for b in blocks):
        raise UsageError(f"blocks={blocks}: search blocks 0..{det} (up to the outlier layer {det})")
    return det, sorted({b % depth for b in blocks}) if blocks is not None else list(range(det + 1))


@dataclass
class _Stats:
    """What one pass over the images keeps, per searched block: sums of |activation| over the tokens elsewhere, and
    the activations at the outlier tokens themselves."""
    s1: dict
    s2: dict
    at: dict
    log_ratio: list  # (blocks, outliers): |log(norm / image median)| of the outliers, per chunk
    n_high: int = 0
    n_low: int = 0
    n_else: int = 0


def _activation_stats(model, images, det: int, candidates: list[int], ratio: float, tails: str,
                      chunk: int) -> _Stats:
    """One forward per `chunk` images, up to the detection block only (`stop_early`), hooks on the searched MLPs."""
    prefix = int(model.num_prefix_tokens)
    hidden: dict[int, torch.Tensor] = {}
    norms: dict[int, torch.Tensor] = {}
    hooks = [model.blocks[b].mlp.fc2.register_forward_pre_hook(
        lambda m, args, b=b: hidden.__setitem__(b, args[0][:, prefix:])) for b in candidates]
    hooks += [model.blocks[b].register_forward_hook(
        lambda m, args, out, b=b: norms.__setitem__(b, out[:, prefix:].float().norm(dim=-1)))
        for b in range(det + 1)]
    st = _Stats({b: 0 for b in candidates}, {b: 0 for b in candidates}, {b: [] for b in candidates}, [])
    try:
        for x in images.split(chunk):
            hidden.clear()
            norms.clear()
            model.forward_intermediates(x, indices=[det], norm=False, output_fmt="NLC", intermediates_only=True,
                                        stop_early=True)
            high, low = outlier_mask(norms[det], ratio, tails)
            mask = high | low
            st.n_high, st.n_low = st.n_high + int(high.sum()), st.n_low + int(low.sum())
            st.n_else += int((~mask).sum())
            for b in candidates:
                h = hidden[b].float().abs()
                rest = h.masked_fill(mask[..., None], 0).flatten(0, 1)
                st.s1[b] = st.s1[b] + rest.sum(0).double()
                st.s2[b] = st.s2[b] + rest.square().sum(0).double()
                st.at[b].append(h[mask])
            st.log_ratio.append(torch.stack([
                (norms[b] / norms[b].median(1, keepdim=True).values.clamp(min=1e-12)).log()[mask].abs()
                for b in range(det + 1)]))
    finally:
        for hook in hooks:
            hook.remove()
    return st


def _rank(st: _Stats, searched: list[int], top_k: int | None, max_k: int,
          min_separation: float) -> tuple[list[Neuron], float]:
    """The units whose mean at the outliers stands `min_separation` std above elsewhere, by contrast; `top_k` of
    them, or as many as the largest relative drop in contrast keeps. Returns them and the share of outliers at which
    at least one fires."""
    rows = []  # per searched block: (H,) mean at outliers, mean elsewhere, std elsewhere
    for b in searched:
        mean_else = st.s1[b] / max(1, st.n_else)
        std_else = (st.s2[b] / max(1, st.n_else) - mean_else.square()).clamp(min=0).sqrt()
        acts = torch.cat(st.at[b])
        rows.append((acts, acts.double().mean(0), mean_else, std_else))
    contrast = torch.stack([m_out - m_else for _, m_out, m_else, _ in rows])  # (blocks, H)
    std = torch.stack([s for *_, s in rows]).clamp(min=1e-6)
    separation = contrast / std  # units that are quieter at the outliers get a negative one: never kept
    score = contrast.where(separation >= min_separation, torch.zeros_like(contrast)).flatten()
    order = score.argsort(descending=True)
    ranked = score[order]
    eligible = int((ranked > 0).sum())
    if top_k is not None:
        k = min(top_k, eligible)
    elif eligible > 1:  # the largest relative drop among the candidates; none clear (< 2x): keep them all
        head = ranked[:min(eligible, max_k + 1)]
        gaps = head[:-1] / head[1:]
        k = int(gaps.argmax()) + 1 if gaps.max() >= 2 else min(eligible, max_k)
    else:
        k = eligible
    width = contrast.shape[1]
    neurons, fires_any = [], torch.zeros(st.n_high + st.n_low, dtype=torch.bool, device=contrast.device)
    for flat in order[:k].tolist():
        i, unit = divmod(flat, width)
        acts, m_out, m_else, s_else = rows[i]
        fires = acts[:, unit].double() - m_else[unit] > min_separation * std[i, unit]
        fires_any |= fires
        neurons.append(Neuron(searched[i], unit, float(m_out[unit]), float(m_else[unit]),
                              float(separation[i, unit]), float(fires.double().mean())))
    return neurons, float(fires_any.double().mean())
