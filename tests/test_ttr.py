"""Test-time registers: the register-neuron finder and the training-free fix, against the implanted-artifact fixture.

The fixture (`phreg.eval.implant`) writes its artifacts with exactly the mechanism Jiang et al. describe, through
four hidden units of `blocks[3].mlp` whose indices it returns: the ground truth for the finder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from phreg import dense_features
from phreg.config.recipe import ModelCfg
from phreg.data.images import ImageDataset
from phreg.data.scan import scan_images
from phreg.errors import UsageError
from phreg.eval.implant import calibration_images, cancel_artifacts, implant_artifacts
from phreg.eval.tokens import outlier_threshold
from phreg.models.loading import normalization
from phreg.ttr.model import add_test_time_registers, load_test_time_registers, save_test_time_registers
from phreg.ttr.neurons import find_register_neurons, outlier_mask

from conftest import MODEL


@pytest.fixture(scope="module")
def artifacts(teacher224):
    """(artifact model, what was implanted): DINOv2-S at 224 px with the fixture's high-norm artifacts."""
    model = copy.deepcopy(teacher224)
    cfg = ModelCfg(name=MODEL, img_size=224)
    return model, implant_artifacts(model, calibration_images(224, *normalization(model, cfg)))


@pytest.fixture(scope="module")
def low_norm(artifacts):
    """The same implant refitted to end with *low* last-block norms (`phreg.eval.implant.cancel_artifacts`)."""
    model, implanted = artifacts
    model = copy.deepcopy(model)
    fit = cancel_artifacts(model, calibration_images(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crops=4),
                           implanted)
    assert fit["fired_ratio_median"] < 0.5  # the variant is what it says
    return model, implanted


@pytest.fixture(scope="module")
def frames(camvid) -> dict[str, torch.Tensor]:
    """CamVid frames at 224 px: 16 train frames to find neurons on, the 15 val frames to measure on."""
    out = {}
    for split, n in (("train", 16), ("val", 15)):
        files, _ = scan_images(camvid[split])
        data = ImageDataset(files[:n], 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), train=False)
        out[split] = data.images()
    return out


def precision_recall(found, implanted) -> tuple[float, float]:
    truth = {(implanted["block"], u) for u in implanted["units"]}
    got = {(n.layer, n.index) for n in found.neurons}
    return len(got & truth) / max(1, len(got)), len(got & truth) / len(truth)


@torch.no_grad()
def last_block_norms(model, x) -> torch.Tensor:
    return model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True)[-1] \
        .norm(dim=-1)


def outlier_count(norms: torch.Tensor, tails: str = "both") -> int:
    return int(sum(m.sum() for m in outlier_mask(norms, tails=tails)))


@torch.no_grad()
def cls_cosine(a, b, x) -> torch.Tensor:
    return F.cosine_similarity(a.forward_features(x)[:, 0], b.forward_features(x)[:, 0], dim=-1)


@pytest.mark.slow
def test_the_finder_recovers_the_implanted_neurons(artifacts, frames):
    model, implanted = artifacts
    found = find_register_neurons(model, frames["train"])
    precision, recall = precision_recall(found, implanted)
    print(found.table(), f"\nprecision {precision:.2f} recall {recall:.2f}")
    assert precision == 1.0 and recall == 1.0
    assert found.appear == implanted["block"] and found.searched == list(range(implanted["block"] + 1))
    assert found.outliers["high"] > 20 and found.outliers["low"] == 0 and found.coverage > 0.95
    assert all(n.at_outliers > 10 * n.elsewhere and n.share > 0.9 for n in found.neurons)
    assert found.by_layer() == {implanted["block"]: [n.index for n in found.neurons]}
    exact = find_register_neurons(model, frames["train"], top_k=2, chunk=5)  # the authors' manual top-k
    assert len(exact.neurons) == 2 and {n.index for n in exact.neurons} <= set(implanted["units"])


@pytest.mark.slow
def test_test_time_registers_remove_the_outliers_and_keep_the_class_token(artifacts, frames, teacher224):
    model, _ = artifacts
    val = frames["val"]
    with torch.no_grad():
        reference = model.forward_features(val[:2])
    ttr = add_test_time_registers(model, find_register_neurons(model, frames["train"]))
    assert ttr.num_prefix_tokens == model.num_prefix_tokens + 1 and ttr.reg_token.abs().max() == 0
    assert ttr.blocks[0].mlp.fc1.weight.data_ptr() == model.blocks[0].mlp.fc1.weight.data_ptr()  # shared, not copied
    assert not any(p.requires_grad for p in ttr.parameters())  # frozen like the teacher it came from
    before, after = last_block_norms(model, val), last_block_norms(ttr, val)
    n0, n1 = outlier_count(before), outlier_count(after)
    thr = outlier_threshold(before)["threshold"]  # the teacher's own `inspect` threshold, as eval judges students
    t0, t1 = int((before > thr).sum()), int((after > thr).sum())
    print(f"outliers on val: {n0} -> {n1} (ratio rule), {t0} -> {t1} (inspect threshold {thr:.1f})")
    assert n0 > 50 and n1 <= 0.1 * n0 and t0 > 50 and t1 <= 0.1 * t0
    # The artifacts themselves move the class token (cosine ~0.94 to the clean model's); the fix brings it back.
    to_clean, teacher_to_clean = cls_cosine(teacher224, ttr, val), cls_cosine(teacher224, model, val)
    to_teacher = cls_cosine(model, ttr, val)
    print(f"CLS cosine: fixed vs clean {to_clean.mean():.4f}, artifact teacher vs clean {teacher_to_clean.mean():.4f},"
          f" fixed vs artifact teacher {to_teacher.mean():.4f}")
    assert to_clean.mean() >= 0.99 and to_clean.mean() > teacher_to_clean.mean()
    # what eval / inspect read: dense_features with any head, forward_features, the teacher untouched
    with torch.no_grad():
        feats = ttr.forward_features(val[:2])
        assert torch.equal(dense_features(ttr, val[:2], "final").flatten(1, 2), feats[:, ttr.num_prefix_tokens:])
        pre = dense_features(ttr, val[:2], "last_block").norm(dim=-1)
        assert outlier_count(pre.flatten(1)) == 0 and outlier_count(before[:2]) > 0
        assert dense_features(ttr, val[:2], "maskclip").shape == (2, 16, 16, 384)
        assert torch.equal(model.forward_features(val[:2]), reference)  # the teacher is left as it was
        plain = add_test_time_registers(model, {})
        assert outlier_count(last_block_norms(plain, val[:2])) > 0  # the token alone fixes nothing: the hooks do


def test_clean_dinov2_has_no_register_neurons(teacher224, frames):
    found = find_register_neurons(teacher224, frames["train"])
    assert not found and found.neurons == [] and found.outliers["tokens"] == 0 and found.appear is None
    assert found.table().startswith("no register neurons")
    ttr = add_test_time_registers(teacher224, found)  # nothing to move: the teacher plus an idle zero token
    assert cls_cosine(teacher224, ttr, frames["val"]).min() > 0.99


@pytest.mark.slow
def test_the_two_tailed_rule_catches_low_norm_artifacts(low_norm, frames):
    model, implanted = low_norm
    both, high = (find_register_neurons(model, frames["train"], tails=t) for t in ("both", "high"))
    print(both.table())
    assert high.outliers["tokens"] == 0 and not high  # a high-tail rule calls this model clean
    assert both.outliers["low"] > 20 and both.outliers["high"] == 0
    precision, recall = precision_recall(both, implanted)
    assert precision == 1.0 and recall == 1.0
    ttr = add_test_time_registers(model, both)
    n0, n1 = outlier_count(last_block_norms(model, frames["val"])), outlier_count(last_block_norms(ttr, frames["val"]))
    print(f"low-norm outliers on val: {n0} -> {n1}")
    assert n0 > 10 and n1 <= 0.1 * n0


@pytest.mark.slow
def test_save_and_load_give_the_same_model(artifacts, frames, tmp_path, dinov2_file):
    model, _ = artifacts
    weights = tmp_path / "published" / "artifacts.safetensors"
    weights.parent.mkdir()
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    found = find_register_neurons(model, frames["train"])
    ttr = add_test_time_registers(model, found)
    side = save_test_time_registers(ttr, weights.parent, ModelCfg(name=MODEL, checkpoint=str(weights), img_size=224))
    record = json.loads(side.read_text())
    assert record["schema"] == "phreg.ttr/1" and record["neurons"] == {str(k): v for k, v in found.by_layer().items()}
    base = record["base"]
    assert base["name"] == MODEL and base["weights"]["file"] == weights.name and len(base["weights"]["sha256"]) == 64
    assert "stock timm alone does not apply" in record["note"] and record["patch_value"] == 0
    loaded = load_test_time_registers(weights.parent)  # finds the base weights beside the sidecar
    assert loaded.test_time_registers.neurons == ttr.test_time_registers.neurons
    assert loaded.test_time_registers.found.neurons == found.neurons
    x = frames["val"][:2]
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), ttr.forward_features(x))
    with pytest.raises(UsageError, match="not the base"):
        load_test_time_registers(side, checkpoint=dinov2_file)  # other weights than those the neurons came from
    (tmp_path / "junk.json").write_text('{"schema": "something else"}')
    with pytest.raises(UsageError, match="not a test-time-register sidecar"):
        load_test_time_registers(tmp_path / "junk.json")


def test_eva_family_hooks_move_the_activations():
    """Random-weight EVA-02 (GluMlp, RoPE): one unit made to write outliers is found, and its activation moves."""
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=4, num_classes=0).eval()
    x = torch.randn(8, 3, 224, 224)
    seen = []
    hook = model.blocks[1].mlp.fc2.register_forward_pre_hook(lambda m, a: seen.append(a[0][:, 1:].abs().flatten(0, 1)))
    with torch.no_grad():
        model.forward_features(x)
    hook.remove()
    unit = int((seen[0].quantile(0.99, 0) / seen[0].median(0).values).argmax())  # the most sparsely firing unit
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[:, unit] *= 300  # ... now writes outliers wherever it fires
    found = find_register_neurons(model, x)
    assert [(n.layer, n.index) for n in found.neurons] == [(1, unit)] and found.outliers["tokens"] > 0

    ttr = add_test_time_registers(model, found)
    reg, first = ttr.num_prefix_tokens - 1, ttr.num_prefix_tokens
    fc2 = ttr.blocks[1].mlp.fc2
    before, after = [], []
    fc2.register_forward_pre_hook(lambda m, a: before.append(a[0][..., unit].clone()), prepend=True)
    fc2.register_forward_pre_hook(lambda m, a: after.append(a[0][..., unit].clone()))
    with torch.no_grad():
        feats = ttr.forward_features(x)
    b, a = before[0], after[0]
    extreme = torch.where(b.amax(1).abs() >= b.amin(1).abs(), b.amax(1), b.amin(1))
    assert torch.equal(a[:, reg], extreme) and a[:, first:].abs().max() == 0 and torch.equal(a[:, 0], b[:, 0])
    assert feats.shape == (8, 16 * 16 + 2, 192) and outlier_count(last_block_norms(ttr, x)) == 0
    assert dense_features(ttr, x[:2], "maskclip").shape == (2, 16, 16, 192)
    # with autograd on, the hook edits a copy instead of the activation in place
    ttr.forward_features(x[:1].requires_grad_()).sum().backward()


def test_mistakes_are_one_line(teacher224, frames):
    x = frames["train"][:2]
    with pytest.raises(UsageError, match="tails"):
        find_register_neurons(teacher224, x, tails="upper")
    with pytest.raises(UsageError, match="above 1"):
        find_register_neurons(teacher224, x, ratio=1.0)
    with pytest.raises(UsageError, match="blocks"):
        find_register_neurons(teacher224, x, blocks=[12])
    with pytest.raises(UsageError, match="layer"):
        find_register_neurons(teacher224, x, layer=12)
    with pytest.raises(UsageError, match="do not exist"):
        add_test_time_registers(teacher224, {3: [1536]})
    with pytest.raises(UsageError, match="do not exist"):
        add_test_time_registers(teacher224, {12: [0]})


@pytest.fixture(scope="module")
def artifact_file(artifacts, tmp_path_factory):
    model, _ = artifacts
    path = tmp_path_factory.mktemp("ttr") / "artifacts.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
def test_inspect_neurons_names_the_implanted_ones_and_none_in_real_dinov2(artifacts, artifact_file, camvid,
                                                                          dinov2_file, tmp_path, capsys):
    from phreg.cli import main

    _, implanted = artifacts
    out = tmp_path / "fixture"
    assert main(["inspect", MODEL, "--checkpoint", str(artifact_file), "--images", str(camvid["train"]),
                 "--limit", "16", "--figures", "2", "--neurons", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "neurons.json").read_text())
    assert {(n["layer"], n["index"]) for n in record["neurons"]} == {(implanted["block"], u) for u in implanted["units"]}
    assert all(f"{implanted['block']:>5} {u:>6}" in printed for u in implanted["units"])  # block, unit per line
    assert "at outliers" in printed
    assert record["figures"] == [f"neurons_{Path(f).stem}.png" for f in record["files"][:2]]  # named after the images
    assert all((out / f).stat().st_size > 10_000 for f in record["figures"])
    side = json.loads((out / "test_time_registers.json").read_text())  # publishable: base weights + sidecar
    assert side["base"]["weights"]["file"] == artifact_file.name and len(side["base"]["weights"]["sha256"]) == 64
    assert {int(b): sorted(u) for b, u in side["neurons"].items()} == {implanted["block"]: sorted(implanted["units"])}
    fixed = tmp_path / "fixed"  # inspect with the sidecar: the fixed model has no outliers left
    assert main(["inspect", MODEL, "--checkpoint", str(artifact_file), "--images", str(camvid["val"]), "--limit", "4",
                 "--views", "1", "--figures", "0", "--ttr", str(out), "--out", str(fixed)]) == 0
    assert "test-time registers" in capsys.readouterr().out
    inspected = json.loads((fixed / "inspect.json").read_text())
    assert inspected["registers"] == 1 and inspected["outliers"]["fraction"] == 0
    clean = tmp_path / "clean"
    assert main(["inspect", MODEL, "--checkpoint", str(dinov2_file), "--images", str(camvid["train"]),
                 "--limit", "16", "--figures", "1", "--neurons", "--out", str(clean)]) == 0
    assert "no register neurons" in capsys.readouterr().out
    assert json.loads((clean / "neurons.json").read_text())["neurons"] == []


@pytest.mark.slow
def test_teacher_targets_read_with_test_time_registers(artifacts, artifact_file, camvid):
    """`model.teacher_ttr=find`: the targets' teacher carries the implanted neurons' fix; the student is built from
    the plain teacher (1 + 16 prefix tokens, not 1 + 1 + 16)."""
    from phreg.config.recipe import load_recipe
    from phreg.data.scan import scan_images
    from phreg.distill.step import build_parts

    _, implanted = artifacts
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml",
                         [f"model.checkpoint={artifact_file}", "model.teacher_ttr=find"])
    files, _ = scan_images(camvid["train"])
    parts = build_parts(recipe, torch.device("cpu"), files=files)
    assert {b: sorted(u) for b, u in parts.teacher_ttr["neurons"].items()} == \
        {str(implanted["block"]): sorted(implanted["units"])}
    assert parts.targets.teacher.test_time_registers.neurons.keys() == {implanted["block"]}
    assert parts.student.num_prefix_tokens == 1 + 16 and parts.targets.teacher.num_prefix_tokens == 2
    plain = build_parts(load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml",
                                    [f"model.checkpoint={artifact_file}"]), torch.device("cpu"))
    assert plain.teacher_ttr is None and not hasattr(plain.targets.teacher, "test_time_registers")
