"""`phreg eval --dataset KIND:DIR`: each standard layout, built small in tmp_path in its real formats (VOC palette PNGs
with 255 borders, ADE20K's 0 = "other" shifted labels, Cityscapes' labelIds, NYUv2's 16-bit millimetre depth with
zeros), lands on the right files, split, classes, ignore value and labels; a wrong or incomplete folder is one line
before any model loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phreg.errors import UsageError
from phreg.eval.datasets import LAYOUTS, from_flags, open_dataset
from phreg.eval.inputs import read_depth, read_mask


def rgb(path: Path, w: int = 20, h: int = 16, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def voc(root: Path, train=("2007_000032", "2007_000039"), val=("2007_000033",)) -> Path:
    """VOC2012 as the tar unpacks it (VOCdevkit/VOC2012): JPEGs, palette masks with a 255 border, the list files."""
    base = root / "VOCdevkit" / "VOC2012"
    palette = [0] * 768
    palette[3:6], palette[15 * 3:15 * 3 + 3], palette[255 * 3:] = [128, 0, 0], [192, 128, 128], [224, 224, 192]
    for i, stem in enumerate(train + val):
        rgb(base / "JPEGImages" / f"{stem}.jpg", seed=i)
        mask = np.zeros((16, 20), np.uint8)
        mask[4:12, 5:15] = 15  # a person
        mask[3, 5:15] = mask[12, 5:15] = 255  # its border: not scored
        m = Image.fromarray(mask, "P")
        m.putpalette(palette)
        (base / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        m.save(base / "SegmentationClass" / f"{stem}.png")
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("".join(f"{s}\n" for s in train))
    (lists / "val.txt").write_text("".join(f"{s}\n" for s in val))
    return root


def ade20k(root: Path) -> Path:
    base = root / "ADEChallengeData2016"
    for split, stems in (("training", ("ADE_train_00000001", "ADE_train_00000002")),
                         ("validation", ("ADE_val_00000001",))):
        for i, stem in enumerate(stems):
            rgb(base / "images" / split / f"{stem}.jpg", seed=i)
            mask = np.zeros((16, 20), np.uint8)  # 0: "other", not a class
            mask[:8] = 1  # wall: class 0 once shifted
            mask[8:, :10] = 150  # flag: class 149
            (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask, "L").save(base / "annotations" / split / f"{stem}.png")
    return base


def cityscapes(root: Path) -> Path:
    for split, names in (("train", ("aachen/aachen_000000_000019", "bochum/bochum_000000_000313")),
                         ("val", ("frankfurt/frankfurt_000000_000294",))):
        for i, name in enumerate(names):
            rgb(root / "leftImg8bit" / split / f"{name}_leftImg8bit.png", seed=i)
            ids = np.zeros((16, 20), np.uint8)  # 0: unlabeled
            ids[:, :5], ids[:, 5:10], ids[:, 10:15], ids[:, 15:] = 7, 26, 33, 1  # road, car, bicycle, ego vehicle
            path = root / "gtFine" / split / f"{name}_gtFine_labelIds.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ids, "L").save(path)
    return root


def nyu(root: Path, size=(640, 480)) -> Path:
    """The Monocular-Depth-Estimation-Toolbox layout: scene folders, 16-bit depth in mm, 'RGB DEPTH focal' lists."""
    base = root / "nyu"
    lines = {"train": [], "test": []}
    for split, frames in (("train", ("basement_0001a/00000", "basement_0001a/00001")), ("test", ("bathroom/00045",))):
        for i, frame in enumerate(frames):
            scene, n = frame.split("/")
            rgb(base / scene / f"rgb_{n}.jpg", *size, seed=i)
            depth = np.full(size[::-1], 2500 + 1000 * i, np.uint16)  # 2.5 m, 3.5 m
            depth[:, :40] = 0  # no measurement
            Image.fromarray(depth).save(base / scene / f"sync_depth_{n}.png")
            lines[split].append(f"/{scene}/rgb_{n}.jpg /{scene}/sync_depth_{n}.png 518.8579\n")
    lines["train"].append("/basement_0001a/rgb_00002.jpg None 518.8579\n")  # listed without depth: skipped
    (base / "nyu_train.txt").write_text("".join(lines["train"]))
    (base / "nyu_test.txt").write_text("".join(lines["test"]))
    return root


def test_voc_palette_masks_keep_their_ids_and_the_255_border_is_ignored(tmp_path):
    data = open_dataset(f"voc:{voc(tmp_path)}")  # the VOCdevkit folder: VOC2012 is found inside it
    assert [f.name for f in data.files] == ["2007_000032.jpg", "2007_000039.jpg", "2007_000033.jpg"]
    assert (data.train, data.val, data.val_name) == ([0, 1], [2], "val")
    assert (data.num_classes, data.ignore_index, len(data.classes)) == (21, 255, 21)
    assert data.titles[0] == "background" and data.classes[15].startswith("person")
    mask = read_mask(data.masks[2], data.files[2], data.num_classes, data.ignore_index, data.label_map)
    assert mask[8, 10] == 15 and mask[3, 10] == 255 and mask[0, 0] == 0  # palette index, not the colour
    assert data.analysed == [2]  # a benchmark's artifact metrics run on its scored split


def test_ade20k_labels_are_shifted_and_other_is_ignored(tmp_path):
    data = open_dataset(f"ade20k:{ade20k(tmp_path)}")
    assert [f.parent.name for f in data.files] == ["training", "training", "validation"]
    assert (len(data.train), len(data.val), data.num_classes, data.ignore_index) == (2, 1, 150, 255)
    mask = read_mask(data.masks[2], data.files[2], 150, 255, data.label_map)
    assert (mask[0, 0], mask[15, 0], mask[15, 19]) == (0, 149, 255)  # wall, flag, "other"
    assert data.classes[0] == "wall" and data.classes[149] == "flag"


def test_cityscapes_label_ids_become_the_19_train_ids(tmp_path):
    data = open_dataset(f"cityscapes:{cityscapes(tmp_path)}")
    assert [f.name for f in data.files] == ["aachen_000000_000019_leftImg8bit.png",
                                            "bochum_000000_000313_leftImg8bit.png",
                                            "frankfurt_000000_000294_leftImg8bit.png"]
    assert data.masks[2].name == "frankfurt_000000_000294_gtFine_labelIds.png" and data.num_classes == 19
    mask = read_mask(data.masks[2], data.files[2], 19, 255, data.label_map)
    assert mask[0, [0, 5, 10, 15]].tolist() == [0, 13, 18, 255]  # road, car, bicycle, ego vehicle (ignored)
    assert data.classes[13] == "car"


def test_nyu_lists_pair_rgb_and_16_bit_millimetre_depth_and_name_the_test_split(tmp_path):
    data = open_dataset(f"nyu:{nyu(tmp_path)}")
    assert [f"{f.parent.name}/{f.name}" for f in data.files] == [
        "basement_0001a/rgb_00000.jpg", "basement_0001a/rgb_00001.jpg", "bathroom/rgb_00045.jpg"]
    assert (data.train, data.val, data.val_name, data.masks) == ([0, 1], [2], "test", None)
    assert data.eval_crop == (45, 471, 41, 601) and data.max_depth == 10 and data.depth_probe
    depth = read_depth(data.depth[1], data.depth_scale)
    assert depth.dtype == np.float32 and depth[0, 100] == pytest.approx(3.5) and depth[0, 0] == 0


def test_limit_takes_the_first_images_of_each_split(tmp_path):
    data = open_dataset(f"voc:{voc(tmp_path)}", limit=1)
    assert [f.stem for f in data.files] == ["2007_000032", "2007_000033"] and (data.train, data.val) == ([0], [1])


@pytest.mark.parametrize("kind, build, breaks, message", [
    ("voc", voc, "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt",
     "no ImageSets/Segmentation/val.txt (the val split); expected JPEGImages, SegmentationClass"),
    ("voc", voc, "VOCdevkit/VOC2012/JPEGImages/2007_000039.jpg",
     "1 of the 2 train images listed are missing (first: JPEGImages/2007_000039.jpg)"),
    ("ade20k", ade20k, "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png",
     "1 of the 1 val labels listed are missing (first: annotations/validation/ADE_val_00000001.png)"),
    ("cityscapes", cityscapes, "leftImg8bit/val", "no leftImg8bit/val/*/*_leftImg8bit.png (the val split)"),
    ("nyu", nyu, "nyu/nyu_test.txt", "no nyu_test.txt or test.txt (the test split)"),
])
def test_an_incomplete_folder_is_one_line_naming_what_is_missing(tmp_path, kind, build, breaks, message):
    import shutil

    build(tmp_path)
    gone = tmp_path / breaks
    shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    with pytest.raises(UsageError, match="^--dataset ") as e:
        open_dataset(f"{kind}:{tmp_path}")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_wrong_labels_are_caught_before_any_model(tmp_path):
    root = nyu(tmp_path, size=(64, 48))  # not NYUv2's 640x480: the Eigen crop would be meaningless
    with pytest.raises(UsageError, match="depth map sync_depth_00000.png is 64x48; expected 640x480, the benchmark's"):
        open_dataset(f"nyu:{root}")
    root = voc(tmp_path / "v")
    Image.fromarray(np.full((16, 20), 40, np.uint8), "L").save(
        root / "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png")
    with pytest.raises(UsageError, match=r"class ids outside 0..20 \(ignore index 255\): \[40\]"):
        open_dataset(f"voc:{root}")
    for spec, message in (("pascal:/x", "expected KIND:DIR with KIND one of voc, ade20k, cityscapes, nyu"),
                          (f"voc:{tmp_path / 'none'}", "is not a folder")):
        with pytest.raises(UsageError, match=message):
            open_dataset(spec)


def test_hand_wired_flags_feed_the_same_kind_of_set(tmp_path):
    for i in range(4):
        rgb(tmp_path / "images" / f"f{i}.png", seed=i)
        (tmp_path / "depth").mkdir(exist_ok=True)
        np.save(tmp_path / "depth" / f"f{i}.npy", np.full((16, 20), 1.5 + i, np.float32))
    data = from_flags(tmp_path / "images", depth=tmp_path / "depth")
    assert (data.train, data.val, data.analysed) == ([0, 1, 2], [3], [0, 1, 2, 3])  # every 4th image is val
    assert read_depth(data.depth[3]) == pytest.approx(np.full((16, 20), 4.5))
    np.save(tmp_path / "depth" / "f2.npy", np.ones((8, 20), np.float32))
    with pytest.raises(UsageError, match="depth map f2.npy is 20x8; expected 20x16, its image's size"):
        from_flags(tmp_path / "images", depth=tmp_path / "depth")
    (tmp_path / "depth" / "f2.npy").unlink()
    with pytest.raises(UsageError, match="no depth map for f2.png in"):
        from_flags(tmp_path / "images", depth=tmp_path / "depth")


def test_every_layout_names_its_download_and_its_classes_fit_its_labels():
    for layout in LAYOUTS.values():
        assert layout.download and layout.expects and layout.train.listing and layout.val.listing
        if layout.label_map:
            assert sorted(set(layout.label_map.values())) == list(range(len(layout.classes)))
    assert [len(LAYOUTS[k].classes) for k in ("voc", "ade20k", "cityscapes", "nyu")] == [21, 150, 19, 0]


def test_dataset_class_names_feed_zero_shot(tmp_path):
    from phreg.clip.segmenter import dataset_classes

    data = open_dataset(f"voc:{voc(tmp_path)}")
    classes = dataset_classes(data.classes, data.titles)
    words, owner = classes.queries()
    assert classes.title(0) == "background" and classes.title(15) == "person" and classes.num_labels == 21
    assert "sky" in words and "background" not in words and owner[words.index("tv monitor")] == 20


def test_eval_refuses_a_bad_dataset_in_one_line_before_torch(tmp_path, capsys):
    from phreg.cli import main

    root = voc(tmp_path / "voc")
    jpegs = root / "VOCdevkit" / "VOC2012" / "JPEGImages"
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "recipe.yaml").write_text("{}\n")
    (run / "export" / "config.json").write_text("{}\n")
    for args, message in (
            (["--dataset", f"voc:{root}", "--masks", root], "--dataset brings its own images, labels and split: "
                                                            "leave out --masks"),
            (["--dataset", f"pascal:{root}"], "expected KIND:DIR"),
            (["--images", jpegs, "--depth", tmp_path / "none"], "--depth"),
            (["--images", jpegs, "--masks", jpegs.parent / "SegmentationClass", "--classes"],
             "--classes without a file takes its class names from --dataset"),
            (["--dataset", f"voc:{root}", "--probe-steps", "-1"], "--probe-steps must be >= 0"),
            ([], "pass --images DIR (with --masks / --depth for the probes) or --dataset KIND:DIR")):
        assert main(["eval", "--student", str(run), *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    code = ("import sys; from phreg.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "eval", "--student", str(run), "--dataset", f"ade20k:{root}"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no images/training/*.jpg (the train split)" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
