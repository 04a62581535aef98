"""A model with known high-norm artifacts, made from a clean one: the test fixture for `inspect` and `eval`.

DINOv2-S has no high-norm tokens, so we implant the mechanism Darcet et al. (2024) and Jiang et al. (2025) describe:
a few MLP neurons fire on *redundant, low-variance* patches at a *sparse, position-dependent* subset of grid cells
and write one large vector into the residual stream, which carries it, norm and all, to the last block.
Concretely, for a timm ViT at one resolution (all choices seeded):

1. position code: a random `cells` fraction S of the patch grid gets a marker added to its positional embedding,
   along the direction the pretrained blocks read least (the smallest non-trivial right-singular vector of all qkv
   and fc1 weights times their LayerNorm gains), so the rest of the network barely notices it. Blocks still cancel
   such a marker within a few layers, so it is read in block `depth // 4` (block 3 of 12: a third of the way in,
   where Darcet et al. see artifacts appear).
2. read-outs, fitted in closed form on `calibration` images at that block's MLP input: the marker (Fisher direction
   of the paired marked-minus-clean response, content held fixed) and flatness (ridge regression of -log pixel std
   of each patch).
3. neurons: the `neurons` least important hidden units of that MLP (smallest output weight) are overwritten so that
   pre-activation = gain * (6 * (marker - 1) + flatness - cut): only marked cells whose content is among the flattest
   `flat_fraction` fire. Their output column writes `norm_ratio` x (median last-block patch norm) along a seeded
   direction (divided by LayerScale).

Everything is a plain weight edit: the result is still a stock timm VisionTransformer, saved as safetensors.
`python -m phreg.eval.implant --out artifacts.safetensors` builds the one the tests use (DINOv2-S/14 at 224 px,
calibrated on the embedded photos); `--low-norm` its low-norm variant (`cancel_artifacts`: PH-Reg's Fig. 6 shows
CLIP artifacts whose last-block norm is *below* the others'; the implanted neurons keep firing where they did, but
their output column is refitted so that what they write cancels what the later blocks add to those tokens: a
high-tail rule at the last block sees nothing there, a two-tailed one sees them).
"""

from __future__ import annotations

import argparse
import json

import safetensors.torch
import torch
from timm.models.vision_transformer import VisionTransformer

from ..data.images import ImageDataset
from ..data.scan import embedded_photos, scan_images


def calibration_images(img_size: int, mean, std, crops: int = 8, seed: int = 0) -> torch.Tensor:
    """Random crops of the embedded photos (deterministic): (4 * crops, 3, S, S)."""
    files, _ = scan_images(embedded_photos())
    data = ImageDataset(files, img_size, mean, std, seed=seed, resize=int(img_size * 1.5), train=True)
    return data.images([(e, i) for e in range(crops) for i in range(len(files))])


def patch_flatness(images: torch.Tensor, patch: int) -> torch.Tensor:
    """-log of each patch's pixel standard deviation (channel mean): (B, L). High = flat, redundant content."""
    p = images.unfold(2, patch, patch).unfold(3, patch, patch)  # B, C, gh, gw, p, p
    return -(p.flatten(-2).std(-1).mean(1) + 1e-3).log().flatten(1)


@torch.no_grad()
def mlp_inputs(model: VisionTransformer, images: torch.Tensor, block: int) -> torch.Tensor:
    """Patch tokens entering the MLP of `block` (after its norm2): (B, L, D)."""
    seen = []
    handle = model.blocks[block].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    for chunk in images.split(16):
        model.forward_features(chunk)
    handle.remove()
    return torch.cat(seen)[:, model.num_prefix_tokens:]


def least_read_direction(model: VisionTransformer) -> torch.Tensor:
    """Unit vector (zero mean) that the blocks' qkv and fc1 layers read least, through their LayerNorm gains."""
    rows = [w for blk in model.blocks
            for w in (blk.attn.qkv.weight * blk.norm1.weight, blk.mlp.fc1.weight * blk.norm2.weight)]
    m = torch.cat(rows).double()
    _, _, vh = torch.linalg.svd(m - m.mean(1, keepdim=True), full_matrices=False)
    u = vh[-2].float()  # vh[-1] is the all-ones direction that LayerNorm removes anyway
    u = u - u.mean()
    return u / u.norm()


@torch.no_grad()
def implant_artifacts(model: VisionTransformer, calibration: torch.Tensor, block: int | None = None,
                      cells: float = 0.1, flat_fraction: float = 0.4, neurons: int = 4, strength: float = 0.4,
                      norm_ratio: float = 4.0, seed: int = 0) -> dict:
    """Edit `model` in place; returns what was implanted (cells, block, units, fit quality) for the record."""
    g = torch.Generator().manual_seed(seed)
    block = len(model.blocks) // 4 if block is None else block
    gh, gw = model.patch_embed.grid_size
    n_cells, dim = gh * gw, model.embed_dim
    marked = torch.zeros(n_cells, dtype=torch.bool)
    marked[torch.randperm(n_cells, generator=g)[:max(1, round(cells * n_cells))]] = True

    clean = mlp_inputs(model, calibration, block).double()
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    input_norm = model._pos_embed(model.patch_embed(calibration[:4]))[:, -n_cells:].norm(dim=-1).median()
    model.pos_embed.data[0, prefix:][marked] += strength * input_norm * least_read_direction(model)
    feats = mlp_inputs(model, calibration, block).double()  # B, L, D with the marker

    response = (feats - clean)[:, marked].reshape(-1, dim).mean(0)
    others = feats[:, ~marked].reshape(-1, dim)
    w_m = torch.linalg.solve(torch.cov(others.T) + 1e-3 * torch.eye(dim, dtype=others.dtype), response)
    r = feats @ w_m
    lo, hi = r[:, ~marked].mean(), r[:, marked].mean()
    w_m, c_m = w_m / (hi - lo), -lo / (hi - lo)  # marker score: unmarked ~ 0, marked ~ 1
    x = feats.reshape(-1, dim)
    flat = patch_flatness(calibration, model.patch_embed.patch_size[0]).reshape(-1).double()
    xc = x - x.mean(0)
    w_v = torch.linalg.solve(xc.T @ xc + 1e-2 * len(xc) * torch.eye(dim, dtype=x.dtype), xc.T @ (flat - flat.mean()))
    spread = (xc @ w_v).std()
    w_v, c_v = w_v / spread, -(x.mean(0) @ w_v) / spread  # flatness, roughly a z-score
    z_v = (feats @ w_v + c_v)[:, marked]
    cut = torch.quantile(z_v.flatten(), 1 - flat_fraction)
    gain = 4.0
    weight, bias = gain * (6 * w_m + w_v), gain * (6 * c_m - 6 + c_v - cut)

    mlp, ls2 = model.blocks[block].mlp, getattr(model.blocks[block], "ls2", None)
    units = mlp.fc2.weight.norm(dim=0).argsort()[:neurons]
    pre = feats @ weight + bias  # B, L
    typical = torch.nn.functional.gelu(pre[pre > 0]).median() if (pre > 0).any() else torch.tensor(1.0)
    v = torch.randn(dim, generator=g)
    v = v / v.norm() * norm_ratio * _final_patch_norm(model, calibration)
    column = (v / (neurons * typical)).float()
    if ls2 is not None and hasattr(ls2, "gamma"):
        column = column / ls2.gamma.data
    mlp.fc1.weight.data[units] = weight.float()
    mlp.fc1.bias.data[units] = bias.float()
    mlp.fc2.weight.data[:, units] = column.unsqueeze(1).expand(-1, neurons)
    fires = pre > 0
    flat_corr = torch.corrcoef(torch.stack([xc @ w_v, flat]))[0, 1]
    return dict(block=block, units=units.tolist(), marked_cells=marked.nonzero().flatten().tolist(), grid=[gh, gw],
                written_norm=float(v.norm()), flatness_fit_corr=float(flat_corr),
                marker_separation_sigma=float((hi - lo) / r[:, ~marked].std()),
                calibration_fire_fraction=float(fires.float().mean()),
                calibration_fires_off_marker=int(fires[:, ~marked].sum()))


def _final_patch_norm(model: VisionTransformer, images: torch.Tensor) -> float:
    with torch.no_grad():
        out = model.forward_intermediates(images[:8], indices=1, norm=False, output_fmt="NLC",
                                          intermediates_only=True)[-1]
    return float(out.norm(dim=-1).median())


@torch.no_grad()
def cancel_artifacts(model: VisionTransformer, calibration: torch.Tensor, implanted: dict, steps: int = 6,
                     rate: float = 0.6, fire: float = 1.0) -> dict:
    """Refit the implanted units' output column (in place) so their tokens end the network with a low norm.

    `implanted`: what `implant_artifacts` returned for `model`. Each step runs the blocks from the implant block on
    (its input does not change) and moves the write by `rate` x minus the activation-weighted mean last-block token
    at the positions where the units fire (summed activation > `fire`). On DINOv2-S at 224 px, 6 steps on 16
    calibration images take the median firing token from 3.8x to ~0.4x its image's median norm (6 s on 2 cores).
    Returns the fit's record.
    """
    block, units = implanted["block"], torch.tensor(implanted["units"])
    prefix = model.num_prefix_tokens
    mlp = model.blocks[block].mlp
    gamma = getattr(getattr(model.blocks[block], "ls2", None), "gamma", None)
    gamma = gamma.detach() if gamma is not None else torch.ones(model.embed_dim)
    entering, fired = [], []
    hooks = [model.blocks[block].register_forward_pre_hook(lambda m, args: entering.append(args[0])),
             mlp.fc2.register_forward_pre_hook(lambda m, args: fired.append(args[0][:, prefix:, units].sum(-1)))]
    try:
        model.forward_intermediates(calibration, indices=[block], intermediates_only=True, stop_early=True)
        for _ in range(steps + 1):
            fired.clear()
            x = entering[0]
            for blk in model.blocks[block:]:
                x = blk(x)
            a = fired[0]
            on = a > fire
            last = x[:, prefix:][on]
            norms = x[:, prefix:].norm(dim=-1)
            ratio = (norms / norms.median(1, keepdim=True).values)[on]
            if _ == steps:
                break
            g = (last * a[on, None]).sum(0) / a[on].sum()  # the mean last-block token where they fire
            mlp.fc2.weight.data[:, units] -= (rate * g / (a[on].median() * gamma))[:, None]
    finally:
        for h in hooks:
            h.remove()
    return dict(steps=steps, fired_tokens=int(on.sum()), fired_ratio_median=float(ratio.median()),
                fired_ratio_below_half=float((ratio < 0.5).float().mean()))


def main(argv=None) -> None:
    from ..config.recipe import ModelCfg
    from ..models.loading import load_teacher, normalization

    ap = argparse.ArgumentParser(prog="python -m phreg.eval.implant", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_small_patch14_dinov2")
    ap.add_argument("--checkpoint", help="clean weights (default: looked up as phreg does)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--out", required=True, help="where to write the fixture's safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--low-norm", action="store_true",
                    help="the low-norm variant: the same units, refitted to end with low last-block norms "
                         "(cancel_artifacts; CLIP-style artifacts, for the two-tailed rule)")
    args = ap.parse_args(argv)
    cfg = ModelCfg(name=args.model, checkpoint=args.checkpoint, img_size=args.img_size)
    model = load_teacher(cfg)
    mean, std = normalization(model, cfg)
    info = implant_artifacts(model, calibration_images(args.img_size, mean, std), seed=args.seed)
    if args.low_norm:
        
        info["low_norm_fit"] = cancel_artifacts(model, calibration_images(args.img_size, mean, std, crops=4), info)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out,
                                metadata={"phreg_fixture": json.dumps(info)})
    print(json.dumps({k: v for k, v in info.items() if k != "marked_cells"} | {"marked": len(info["marked_cells"])}))


if __name__ == "__main__":
    main()
