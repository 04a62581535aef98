"""CLIP's other half: whole-CLIP checkpoints, the text tower, zero-shot segmentation, and a CLIP run end to end."""

import csv
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import phreg
from phreg.cli import main
from phreg.clip.segmenter import Segmenter, read_classes, windows
from phreg.clip.text import load_saved, load_text_tower
from phreg.config.recipe import ModelCfg
from phreg.errors import UsageError
from phreg.eval.segmentation import confusion, scores
from phreg.models.loading import load_teacher
from phreg.run.folder import TEXT_FILE

from conftest import CAMVID, need

TEXTS = ["a photo of a road", "a bicyclist", "sky"]


@pytest.fixture(scope="module")
def open_clip_b16(tmp_path_factory):
    """A random-init open_clip ViT-B-16 (GELU, as the LAION models) saved as one whole-CLIP safetensors file."""
    import open_clip
    import safetensors.torch

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model, path


@pytest.mark.slow
def test_whole_clip_checkpoint_gives_open_clips_towers(open_clip_b16, tmp_path):
    import open_clip

    reference, path = open_clip_b16
    cfg = ModelCfg(name="vit_base_patch16_clip_224.laion2b", checkpoint=str(path), img_size=224, text_model="ViT-B-16")
    image = load_teacher(cfg)  # timm's own OpenAI / open_clip key conversion
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        reference.visual.output_tokens = True
        pooled, tokens = reference.visual(x)
        reference.visual.output_tokens = False
        final = phreg.dense_features(image, x, "final").flatten(1, 2)
        assert (image(x) - pooled).abs().max() < 1e-4  # class token -> ln_post -> proj
        assert (final - tokens).abs().max() < 1e-4  # ln_post(patch tokens)
        assert (image.head(final) - tokens @ reference.visual.proj).abs().max() < 1e-4  # the projection heads use

        text = load_text_tower(cfg)
        want = reference.encode_text(open_clip.get_tokenizer("ViT-B-16")(TEXTS), normalize=True)
        assert (text.encode(TEXTS) - want).abs().max() < 1e-5
        text.save(tmp_path / TEXT_FILE)
        assert (load_saved(tmp_path / TEXT_FILE).encode(TEXTS) - want).abs().max() < 1e-5


def test_class_files(tmp_path):
    camvid = read_classes(need(CAMVID / "classes.csv"), ignore_index=11)  # id,name,rgb as shipped
    assert camvid.ids == list(range(11)) and camvid.names[0] == ["Sky"] and camvid.names[10] == ["Bicyclist"]
    assert camvid.colours[3] == (128, 64, 128) and camvid.num_labels == 11
    txt = tmp_path / "cls_voc.txt"  # NACLIP's format: line = class, synonyms split by commas
    txt.write_text("sky, wall, tree\naeroplane\nperson, person in shirt\n")
    voc = read_classes(txt)
    words, owner = voc.queries()
    assert voc.ids == [0, 1, 2] and words[:3] == ["sky", "wall", "tree"] and owner.tolist() == [0, 0, 0, 1, 2, 2]
    semi = tmp_path / "c.csv"
    semi.write_text('name,color\n"car; automobile",#ff0000\n')
    assert read_classes(semi).names == [["car", "automobile"]] and read_classes(semi).colours == [(255, 0, 0)]
    for text, message in [("id,label\n0,a\n", "'name' column"), ("id,name\n0,a\n0,b\n", "repeat"),
                          ("id,name,rgb\n0,a,1 2\n", "colour"), ("id,name\nx,a\n", "not an integer")]:
        semi.write_text(text)
        with pytest.raises(UsageError, match=message):
            read_classes(semi)


def test_windows_by_hand():
    """CamVid at short side 448 is 448 x 597: rows start at 0, 112; columns at 0, 112, 224 and 261 (the last one
    shifted back inside the image)."""
    assert windows(448, 597, 336, 112) == [(y, x) for y in (0, 112) for x in (0, 112, 224, 261)]
    assert windows(336, 336, 336, 112) == [(0, 0)]


# ------------------------------------------------------------------------------------- zero-shot on real features

def _frames(split: str, every: int = 1, limit: int | None = None) -> list[tuple[np.ndarray, torch.Tensor]]:
    with open(CAMVID / "manifest.csv") as f:
        rows = [r["file"] for r in csv.DictReader(f) if r["split"] == split][::every][:limit]
    out = []
    for name in rows:
        rgb = np.array(Image.open(CAMVID / "images" / name).convert("RGB"))
        out.append((rgb, torch.from_numpy(np.asarray(Image.open(CAMVID / "masks" / name)).astype(np.int64))))
    return out


@pytest.fixture(scope="module")
def prototypes(teacher224):
    """Class embeddings given directly: DINOv2-S's mean normalized patch feature per CamVid class, from the labelled
    pixels of every 4th train frame (13 of 52; a stand-in for CLIP's text embeddings, which cannot be fetched here)."""
    need(CAMVID)
    mean, std = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1), torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    sums, counts = torch.zeros(11, 384), torch.zeros(11)
    for rgb, mask in _frames("train", every=4):
        x = F.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255, size=(224, 224),
                          mode="bilinear", align_corners=False)
        with torch.no_grad():
            f = F.normalize(phreg.dense_features(teacher224, (x - mean) / std, "final")[0], dim=-1)  # (16, 16, D)
        labels = F.interpolate(mask[None, None].float(), size=(16, 16), mode="nearest")[0, 0].long().flatten()
        keep = labels < 11
        sums.index_add_(0, labels[keep], f.flatten(0, 1)[keep])
        counts += torch.bincount(labels[keep], minlength=12)[:11]
    return F.normalize(sums / counts.clamp(min=1)[:, None], dim=-1)


def _segmenter(model, queries, **kw):
    return Segmenter(model, queries, torch.arange(11), list(range(11)), head="final", **kw)


@pytest.mark.slow
def test_prototype_zero_shot_is_far_above_chance(teacher224, prototypes):
    """Sliding window (short side 224, 224 crops every 112 px) and one whole-image pass, on the 15 val frames."""
    results = {}
    for name, kw in (("window", dict(short_side=224, crop=224, stride=112)), ("whole", dict(short_side=224, crop=0))):
        seg = _segmenter(teacher224, prototypes, **kw)
        cm = torch.zeros(11, 11, dtype=torch.long)
        for rgb, mask in _frames("val"):
            x = seg.prepare(rgb, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
            cm += confusion(seg.predict(x, rgb.shape[:2]), mask, 11, 11)
        results[name] = scores(cm)
    print({k: (round(v["miou"], 4), round(v["pixel_accuracy"], 4)) for k, v in results.items()})
    for r in results.values():  # chance: 1/11 pixel accuracy, mIoU ~ 0.05
        assert r["miou"] > 0.2 and r["pixel_accuracy"] > 0.5


def test_sliding_window_equals_one_pass_when_one_crop_covers_the_image(teacher224, prototypes):
    rgb, _ = _frames("val", limit=1)[0]
    square = np.asarray(Image.fromarray(rgb).resize((224, 224), Image.BILINEAR))
    window = _segmenter(teacher224, prototypes, short_side=224, crop=224, stride=112)
    whole = _segmenter(teacher224, prototypes, short_side=224, crop=0)
    x = window.prepare(square, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert x.shape[-2:] == (224, 224)
    assert (window.logits(x) - whole.logits(x)).abs().max() < 1e-5
    assert torch.equal(window.predict(x, (224, 224)), whole.predict(x, (224, 224)))


# ------------------------------------------------------------------------------------------------- end to end

@pytest.fixture
def tiny_clip(tmp_path):
    """A whole CLIP small enough for this CPU: open_clip config with a 2-block ViT-B/16 image tower and a 1-block
    text tower, and a timm folder saying the image tower is `vit_base_patch16_clip_224` with depth 2."""
    import open_clip
    import safetensors.torch
    import timm
    from timm.models._hub import save_config_for_hf

    cfg = {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 2, "width": 768, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 1}}
    (tmp_path / "phreg-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "phreg-tiny-clip.json")
    torch.manual_seed(0)
    clip = open_clip.create_model("phreg-tiny-clip").eval()
    safetensors.torch.save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, tmp_path / "clip.safetensors")
    image = tmp_path / "image_tower"
    image.mkdir()
    tower = timm.create_model("vit_base_patch16_clip_224.laion2b", pretrained=False, depth=2)
    save_config_for_hf(tower, image / "config.json", model_config=dict(model_args=dict(depth=2)))
    return dict(clip=clip, file=tmp_path / "clip.safetensors", image=image)


@pytest.mark.slow
def test_clip_run_end_to_end(tiny_clip, camvid, tmp_path, capsys):
    """distill (NACLIP targets, MaskCLIP student) -> eval --classes -> segment -> push --dry-run, on random weights."""
    import open_clip
    import safetensors.torch

    images = {}
    for split, n in (("train", 2), ("val", 2)):
        images[split] = tmp_path / split
        images[split].mkdir()
        for f in sorted(camvid[split].iterdir())[:n]:
            (images[split] / f.name).symlink_to(f.resolve())
    run = tmp_path / "run"
    assert main(["distill", "recipes/openclip_vitb16.yaml", f"model.name=local-dir:{tiny_clip['image']}",
                 f"model.checkpoint={tiny_clip['file']}", "model.text_model=phreg-tiny-clip", "model.img_size=64",
                 "views.num=2", "cache.enabled=true", "cache.plans=1", "train.max_steps=2", "train.batch_size=1", f"data.root={images['train']}",
                 f"data.val_root={images['val']}", "data.num_workers=0", f"output_dir={run}", "--quiet"]) == 0
    assert (run / "export" / TEXT_FILE).is_file()
    held = json.loads((run / "summary.json").read_text())["heldout"]
    assert held["teacher"] > 0 and held["student"] > 0  # student's MaskCLIP output vs the NACLIP targets

    zs = ["--classes", str(camvid["root"] / "classes.csv"), "--short-side", "64", "--crop", "64", "--stride", "32"]
    assert main(["eval", "--student", str(run), "--images", str(images["val"]), "--masks", str(camvid["masks"]),
                 "--ignore-index", "11", "--views", "2", "--figures", "1", *zs]) == 0
    report = json.loads((run / "eval" / "eval.json").read_text())
    row = next(r for r in report["summary"] if r["metric"] == "zeroshot_miou")
    z = report["zeroshot"]
    assert row["teacher"] == z["teacher"]["miou"] and 0 <= row["student"] <= 1
    assert z["teacher"]["head"] == "naclip" and z["student"]["head"] == "maskclip" and len(z["classes"]) == 11
    assert set(z["student"]["per_class_iou"]) == {"Sky", "Building", "Pole", "Road", "Pavement", "Tree",
                                                  "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist"}
    html = (run / "eval" / "report.html").read_text()
    assert "Zero-shot segmentation" in html and (run / "eval" / z["figures"][0]).is_file()

    seg = tmp_path / "seg"
    assert main(["segment", str(run), "--images", str(images["val"]), "--out", str(seg), "--ignore-index", "11",
                 "--quiet", *zs]) == 0
    for f in images["val"].iterdir():
        labels = np.asarray(Image.open(seg / "labels" / f"{f.stem}.png"))
        assert labels.shape == np.asarray(Image.open(f)).shape[:2] and set(np.unique(labels)) <= set(range(11))
        assert Image.open(seg / "overlays" / f"{f.stem}.png").mode == "RGB"
    assert json.loads((seg / "classes.json").read_text())["head"] == "maskclip"

    hub = tmp_path / "hub"
    assert main(["push", str(run), "--repo-id", "alice/tiny-clip-reg16", "--dry-run", str(hub)]) == 0
    card = (hub / "README.md").read_text()
    assert 'head="maskclip"' in card and "Zero-shot segmentation" in card and (hub / TEXT_FILE).is_file()
    # the few lines the card documents, without phreg: open_clip loads the shipped text tower
    clip = open_clip.create_model("phreg-tiny-clip")
    clip.load_state_dict(safetensors.torch.load_file(hub / TEXT_FILE), strict=False)
    tokens = open_clip.get_tokenizer("phreg-tiny-clip")(TEXTS)
    with torch.no_grad():
        assert torch.allclose(clip.encode_text(tokens), tiny_clip["clip"].encode_text(tokens), atol=1e-5)


def test_segment_checks_cheap_inputs_before_loading_a_model(tmp_path, capsys):
    bad = tmp_path / "classes.csv"
    bad.write_text("id,label\n0,sky\n")
    assert main(["segment", "no-such-model", "--images", str(tmp_path), "--classes", str(bad),
                 "--out", str(tmp_path / "o")]) == 2
    assert "'name' column" in capsys.readouterr().err
    assert main(["eval", "--student", "no-such-run", "--images", str(tmp_path), "--classes", str(bad)]) == 2
    assert "--classes needs --masks" in capsys.readouterr().err


@pytest.mark.parametrize("name, size", [("vit_base_patch16_clip_224", 64), ("eva02_tiny_patch14_224", 56)])
def test_a_resized_model_shares_the_weights_and_computes_what_timm_does(name, size):
    """Windows of another size get timm's `set_input_size` on a copy that shares every weight but pos_embed."""
    import copy

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=2, img_size=size).eval()
    x0 = torch.randn(1, 3, size, size)
    with torch.no_grad():
        before = model.forward_features(x0)
    seg = Segmenter(model, torch.randn(3, 8), torch.arange(3), [0, 1, 2], head="final")
    patch = model.patch_embed.patch_size[0]
    other = (size + 2 * patch, size - patch)
    sized = seg.model_at(other)
    assert seg.model_at(other) is sized  # built once per size
    ptr = {n: p.data_ptr() for n, p in model.named_parameters()}
    for n, p in sized.named_parameters():
        assert (p.data_ptr() == ptr[n]) == (not n.endswith("pos_embed")), n
    reference = copy.deepcopy(model)  # an independent copy, resized
    reference.set_input_size(img_size=other)
    x = torch.randn(2, 3, *other)
    with torch.no_grad():
        assert torch.equal(sized.forward_features(x), reference.forward_features(x))
        assert torch.equal(model.forward_features(x0), before)  # the original is untouched


def test_a_text_tower_tag_offline_and_not_cached_is_one_line_at_once():
    """No hub is reachable here (conftest sets HF_HUB_OFFLINE) and no CLIP is cached: no retries, one line."""
    cfg = ModelCfg(name="eva02_base_patch16_clip_224.merged2b", text_model="EVA02-B-16",
                   text_pretrained="merged2b_s8b_b131k")
    with pytest.raises(UsageError, match=r"no weights for the text tower EVA02-B-16 \(merged2b_s8b_b131k\) "
                                         r"\(HF_HUB_OFFLINE is set, nothing cached\)"):
        load_text_tower(cfg)
