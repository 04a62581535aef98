"""Dense heads against the formulas (NACLIP teacher, MaskCLIP student), on random-init reduced models."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import phreg
from phreg.backbones import add_registers, backbone
from phreg.backbones.heads import gaussian_omega

SIGMA = 1.5


@pytest.fixture(scope="module")
def clip():
    """A 2-block CLIP ViT-B/16 at 64 px (4 x 4 patches), random weights, and its student with 4 random registers."""
    torch.manual_seed(0)
    teacher = timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False, depth=2, img_size=64).eval()
    student = add_registers(teacher, 4, init="randn", seed=1)
    return teacher, student


def last_block_input(model, x):
    seen = {}
    hook = model.blocks[-1].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model.forward_features(x)
    hook.remove()
    return seen["x"]


def formulas(model, x, head, sigma=SIGMA):
    """The heads' formulas, written out with the weights (no phreg code): patch tokens (B, L, D_out)."""
    tokens = last_block_input(model, x)
    blk, P = model.blocks[-1], model.num_prefix_tokens
    B, N, D = tokens.shape
    H = blk.attn.num_heads
    d = D // H
    X = F.layer_norm(tokens, (D,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    q, k, v = (X @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).split(D, -1)
    k, v = (t.reshape(B, N, H, d).transpose(1, 2) for t in (k, v))
    if head == "naclip":
        gw = x.shape[-1] // 16
        i = torch.arange(N - P)
        r, c = (i // gw).float(), (i % gw).float()
        dist2 = (r[:, None] - r[None]) ** 2 + (c[:, None] - c[None]) ** 2
        omega = torch.zeros(N, N)
        omega[P:, P:] = torch.exp(-dist2 / (2 * sigma ** 2))
        A = torch.softmax(k @ k.transpose(-1, -2) * d ** -0.5 + omega, dim=-1)
        out = A @ v
    else:
        out = v
    out = out.transpose(1, 2).reshape(B, N, D) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    out = F.layer_norm(out, (D,), model.norm.weight, model.norm.bias, model.norm.eps)
    return (out @ model.head.weight.T + model.head.bias)[:, P:]


@pytest.mark.parametrize("head", ["naclip", "maskclip"])
@pytest.mark.parametrize("which", ["plain", "registers"])
def test_heads_follow_the_formulas(clip, head, which):
    model = clip[0] if which == "plain" else clip[1]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = phreg.dense_features(model, x, head, sigma=SIGMA)
    want = formulas(model, x, head)
    assert got.shape == (2, 4, 4, 512)  # patch tokens only: no class token, no registers
    diff = (got.flatten(1, 2) - want).abs().max().item()
    print(f"{head} ({which}): max |phreg - formula| = {diff:.2e}")
    assert diff < 1e-5


def test_final_head_is_forward_features(clip):
    model = clip[1]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = phreg.dense_features(model, x, "final")
        want = model.forward_features(x)[:, model.num_prefix_tokens:]
    assert torch.equal(got.flatten(1, 2), want)


def test_maskclip_is_attention_with_an_identity_matrix(clip):
    model = clip[1]
    bb = backbone(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, ctx = bb.last_block_input(x)
        q, k, v = bb.last_block_qkv(tokens, ctx)
        N = k.shape[2]
        identity = torch.full((N, N), float("-inf")).fill_diagonal_(0)  # softmax -> the identity matrix
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=identity)[:, :, model.num_prefix_tokens:]
        want = bb.project(bb.last_block_merge(attn))
        got = bb.patch_tokens(x, "maskclip")
    assert (got - want).abs().max() < 1e-5


def test_omega_by_hand():
    """2 x 3 grid, sigma 1, 1 class token + 2 registers: zero rows / columns for all three prefix tokens."""
    e = lambda d2: math.exp(-d2 / 2)  # noqa: E731
    # cells in row-major order: (0,0) (0,1) (0,2) (1,0) (1,1) (1,2); squared distances between them
    d2 = [[0, 1, 4, 1, 2, 5],
          [1, 0, 1, 2, 1, 2],
          [4, 1, 0, 5, 2, 1],
          [1, 2, 5, 0, 1, 4],
          [2, 1, 2, 1, 0, 1],
          [5, 2, 1, 4, 1, 0]]
    want = torch.zeros(9, 9)
    want[3:, 3:] = torch.tensor([[e(v) for v in row] for row in d2])
    got = gaussian_omega((2, 3), sigma=1.0, prefix=3)
    assert got.shape == (9, 9)
    assert torch.allclose(got, want, atol=1e-7)
    assert got[:3].abs().sum() == 0 and got[:, :3].abs().sum() == 0
    assert abs(got[3, 4].item() - 0.6065307) < 1e-6 and abs(got[3, 8].item() - 0.0820850) < 1e-6


def test_registers_take_part_but_never_reach_the_output(clip):
    """Registers are keys and values of the NACLIP attention (changing them changes the patches) but get zero Omega
    and are not among the outputs."""
    _, student = clip
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = phreg.dense_features(student, x, "naclip")
        student.reg_token.mul_(3.0)
        after = phreg.dense_features(student, x, "naclip")
        student.reg_token.div_(3.0)
    assert before.shape == after.shape == (1, 4, 4, 512)
    assert (before - after).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["vit", "eva", "pe_core", "rope_mixed"])
def test_hooks_reproduce_the_last_blocks_own_attention(clip, family):
    """q/k/v (with RoPE for Eva), SDPA and the merge of the hooks give exactly what the block's attention returns:
    `EvaAttention` (EVA-02: separate q/v biases) and `AttentionRope` (Perception Encoder, per-depth RoPE tables)."""
    if family == "vit":
        model, bb, size = clip[1], backbone(clip[1]), 64
    else:
        name, size = dict(eva=("eva02_tiny_patch14_224", 56), pe_core=("vit_pe_core_small_patch16_384", 64),
                          rope_mixed=("vit_small_patch16_rope_mixed_224", 64))[family]
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, depth=2, img_size=size).eval()
        bb = backbone(model)
    x = torch.randn(2, 3, size, size)
    seen = {}
    hook = model.blocks[-1].attn.register_forward_hook(lambda mod, args, out: seen.setdefault("out", out))
    with torch.no_grad():
        model.forward_features(x)
        tokens, ctx = bb.last_block_input(x)
        q, k, v = bb.last_block_qkv(tokens, ctx)
        mine = bb.last_block_merge(F.scaled_dot_product_attention(q, k, v))
        heads = {h: bb.patch_tokens(x, h) for h in ("naclip", "maskclip")}
    hook.remove()
    assert (mine - seen["out"]).abs().max() < 1e-5
    grid = (size // bb.patch_size) ** 2
    assert all(t.shape[:2] == (2, grid) for t in heads.values())
