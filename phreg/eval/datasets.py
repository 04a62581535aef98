"""What `phreg eval` measures on: `EvalSet` (images, their masks and depth maps, the train / val split, what a label
means), built from the hand-wired flags (`--images --masks --depth --split`) or from a standard benchmark folder
(`--dataset KIND:DIR`).

A benchmark layout is data, one `Layout` per kind in `LAYOUTS`: where each split's images and labels lie, its official
list, the class names (NACLIP's query strings, for zero-shot), the ignore value and the label map. `open_dataset` checks
a folder against its layout and answers what is missing in one line. Torch-free: the command line calls it before any
model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .inputs import check_depth, check_images, check_limit, check_masks, depth_files, mask_files, need_classes, \
    split_indices


@dataclass(frozen=True)
class Split:
    """One split of a layout. `listing`: list files to try in order (one entry per line, whitespace-separated
    columns), or `glob:PATTERN` (each match's key is its path inside the `images` template). `images` and `labels`:
    templates of an entry's image and label paths, filled with its columns (`{0}`, `{1}`)."""
    listing: tuple[str, ...]
    images: str
    labels: str


@dataclass(frozen=True)
class Layout:
    kind: str
    title: str  # the benchmark as papers name it
    download: str  # the public download the folder comes from (nothing is downloaded)
    expects: str  # what DIR must hold, as the one-line answer names it
    train: Split
    val: Split
    val_name: str = "val"  # what the scored split is called (NYUv2: "test", the 654-image Eigen test split)
    nested: tuple[str, ...] = ()  # sub-folders DIR may hold the layout under
    classes: tuple[str, ...] = ()  # label i's query names (NACLIP's strings; synonyms separated by ", ")
    titles: dict[int, str] = field(default_factory=dict)  # a class's name where its first query is not it
    ignore_index: int | None = 255  # the label value never scored (after `label_map`)
    label_map: dict[int, int] | None = None  # mask value -> label; values not listed -> ignore_index; None: as is
    depth_scale: float = 1000.0  # integer depth units per metre
    max_depth: float = 10.0  # pixels deeper than this are not scored (and the depth head's bins end here)
    eval_crop: tuple[int, int, int, int] | None = None  # (top, bottom, left, right) of the scored depth region

    @property
    def task(self) -> str:
        return "segmentation" if self.classes else "depth"


VOC_CLASSES = (
    "sky, wall, tree, wood, grass, road, sea, river, mountain, sands, desk, bed, building, cloud, lamp, door, window, "
    "wardrobe, ceiling, shelf, curtain, stair, floor, hill, rail, fence", "aeroplane", "bicycle", "bird", "ship",
    "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog", "horse", "motorbike",
    "person, person in shirt, person in jeans, person in dress, person in sweater, person in skirt, person in jacket",
    "pottedplant", "sheep", "sofa", "train", "television monitor, tv monitor, monitor, television, screen")

ADE20K_CLASSES = tuple("""wall building sky floor tree ceiling road bed windowpane grass cabinet sidewalk person earth
door table mountain plant curtain chair car water painting sofa shelf house sea mirror rug field armchair seat fence
desk rock wardrobe lamp bathtub railing cushion base box column signboard chestofdrawers counter sand sink skyscraper
fireplace refrigerator grandstand path stairs runway case pooltable pillow screendoor stairway river bridge bookcase
blind coffeetable toilet flower book hill bench countertop stove palm kitchenisland computer swivelchair boat bar
arcademachine hovel bus towel light truck tower chandelier awning streetlight booth televisionreceiver airplane
dirttrack apparel pole land bannister escalator ottoman bottle buffet poster stage van ship fountain conveyerbelt canopy
washer plaything swimmingpool stool barrel basket waterfall tent bag minibike cradle oven ball food step tank tradename
microwave pot animal bicycle lake dishwasher screen blanket sculpture hood sconce vase trafficlight tray ashcan fan pier
crtscreen plate monitor bulletinboard shower radiator glass clock flag""".split())

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "trafficlight", "trafficsign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")

# Cityscapes labelIds -> the 19 train ids (cityscapesScripts' labels.py); every other id is ignored
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

LAYOUTS: dict[str, Layout] = {layout.kind: layout for layout in (
    Layout("voc", "PASCAL VOC 2012 (21 classes)", "VOCtrainval_11-May-2012.tar (host.robots.ox.ac.uk/pascal/VOC)",
           "JPEGImages, SegmentationClass and ImageSets/Segmentation/{train,val}.txt",
           Split(("ImageSets/Segmentation/train.txt",), "JPEGImages/{0}.jpg", "SegmentationClass/{0}.png"),
           Split(("ImageSets/Segmentation/val.txt",), "JPEGImages/{0}.jpg", "SegmentationClass/{0}.png"),
           nested=("VOC2012", "VOCdevkit/VOC2012"), classes=VOC_CLASSES, titles={0: "background"}),
    Layout("ade20k", "ADE20K (SceneParsing, 150 classes)", "ADEChallengeData2016.zip (sceneparsing.csail.mit.edu)",
           "images/{training,validation} and annotations/{training,validation}",
           Split(("glob:images/training/*.jpg",), "images/training/{0}.jpg", "annotations/training/{0}.png"),
           Split(("glob:images/validation/*.jpg",), "images/validation/{0}.jpg", "annotations/validation/{0}.png"),
           nested=("ADEChallengeData2016",), classes=ADE20K_CLASSES,
           label_map={k: k - 1 for k in range(1, 151)}),  # 0 ("other") is ignored, 1..150 -> 0..149
    Layout("cityscapes", "Cityscapes (19 classes, gtFine)",
           "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (cityscapes-dataset.com)",
           "leftImg8bit/{train,val}/CITY/*_leftImg8bit.png and gtFine/{train,val}/CITY/*_gtFine_labelIds.png",
           Split(("glob:leftImg8bit/train/*/*_leftImg8bit.png",), "leftImg8bit/train/{0}_leftImg8bit.png",
                 "gtFine/train/{0}_gtFine_labelIds.png"),
           Split(("glob:leftImg8bit/val/*/*_leftImg8bit.png",), "leftImg8bit/val/{0}_leftImg8bit.png",
                 "gtFine/val/{0}_gtFine_labelIds.png"),
           classes=CITYSCAPES_CLASSES, label_map=CITYSCAPES_TRAIN_IDS),
    Layout("nyu", "NYU Depth v2 (Eigen split, 654 test images)",
           "BTS's sync.zip (training frames) and the official labelled test set, arranged as "
           "Monocular-Depth-Estimation-Toolbox's data/nyu with its nyu_train.txt and nyu_test.txt",
           "nyu_train.txt and nyu_test.txt (or train.txt and test.txt): 'RGB DEPTH [focal]' lines of 16-bit depth PNGs "
           "in millimetres",
           Split(("nyu_train.txt", "train.txt"), "{0}", "{1}"), Split(("nyu_test.txt", "test.txt"), "{0}", "{1}"),
           val_name="test", nested=("nyu",), ignore_index=None, eval_crop=(45, 471, 41, 601)),
)}

DEPTH_SCALE, MAX_DEPTH, MIN_DEPTH = 1000.0, 10.0, 1e-3  # millimetres; NYUv2's range, as the paper's head bins it
PROBE_STEPS = 1000  # the probes' default schedule (`--probe-steps`; the paper's: `probe.SEG`, `depth.DEPTH`)


@dataclass(frozen=True)
class EvalSet:
    """The images eval measures on, in order, with what each is labelled with and which split it is in."""
    files: list[Path]
    train: list[int] = field(default_factory=list)  # indices into `files`: what the probes train on
    val: list[int] = field(default_factory=list)  # ... and are scored on
    masks: list[Path] | None = None  # one per image: the segmentation probe and zero-shot
    depth: list[Path] | None = None  # one per image: the depth probe
    num_classes: int | None = None  # segmentation classes (labels 0..K-1)
    ignore_index: int | None = None
    label_map: tuple[int, ...] | None = None  # a 256-entry lookup table: mask value -> label
    classes: tuple[str, ...] = ()  # the layout's class queries (zero-shot with `--classes` alone)
    titles: dict[int, str] = field(default_factory=dict)
    depth_scale: float = DEPTH_SCALE
    max_depth: float = MAX_DEPTH
    eval_crop: tuple[int, int, int, int] | None = None
    kind: str = "folder"  # a `LAYOUTS` key, or "folder" (the hand-wired flags)
    root: str | None = None  # --images DIR, or the benchmark folder
    split_rule: str = ""  # where the split came from, as eval.json and the model card say it
    val_name: str = "val"
    source: dict = field(default_factory=dict)  # the folders and files it came from (eval.json's `dataset`)

    @property
    def segmentation(self) -> bool:
        return self.masks is not None and self.num_classes is not None and bool(self.val)

    @property
    def depth_probe(self) -> bool:
        return self.depth is not None and bool(self.val)

    @property
    def analysed(self) -> list[int]:
        """The images the artifact metrics run on: every image of --images; a benchmark's scored split."""
        return list(range(len(self.files))) if self.kind == "folder" else list(self.val)


def lookup_table(label_map: dict[int, int] | None, ignore_index: int | None) -> tuple[int, ...] | None:
    """A label map as a 256-entry table (values not listed -> the ignore index)."""
    if label_map is None:
        return None
    table = np.full(256, ignore_index if ignore_index is not None else 255, dtype=np.int64)
    for raw, label in label_map.items():
        table[raw] = label
    return tuple(table.tolist())


def from_flags(images, masks=None, num_classes: int | None = None, ignore_index: int | None = None, split=None,
               depth=None, depth_scale: float = DEPTH_SCALE, max_depth: float = MAX_DEPTH, limit: int = 0,
               need_masks: bool = True) -> EvalSet:
    """The hand-wired flags as an `EvalSet`: images (sorted, at most `limit`), masks and depth maps by file stem, the
    split from `split` (default: every 4th image is val). `need_masks=False`: masks for zero-shot only (no class
    count, no probe)."""
    files = check_images(images, limit)
    mask_list = depth_list = None
    if masks and (num_classes is not None or need_masks):
        need_classes(num_classes)
    if masks:
        mask_list = mask_files(files, masks)
        if num_classes is not None:
            check_masks(files, mask_list, num_classes, ignore_index)
    if depth:
        check_depth_range(depth_scale, max_depth)
        depth_list = depth_files(files, depth)
        check_depth(files, depth_list, depth_scale)
    train, val = ([], []) if not (num_classes is not None or depth) else split_indices(files, split)
    rule = "" if not val else f"from {Path(split).name}" if split else "every 4th image is val"
    source = dict(images=str(images), masks=str(masks) if masks else None, depth=str(depth) if depth else None,
                  split=str(split) if split else None)
    return EvalSet(files, train, val, mask_list, depth_list, num_classes, ignore_index, depth_scale=depth_scale,
                   max_depth=max_depth, root=str(images), split_rule=rule, source=source)


def check_depth_range(depth_scale: float, max_depth: float) -> None:
    if not depth_scale > 0 or not max_depth > MIN_DEPTH:
        raise UsageError(f"--depth-scale must be > 0 and --max-depth > {MIN_DEPTH:g} m")


def parse_spec(spec: str) -> tuple[Layout, Path]:
    """`KIND:DIR` -> the layout and the folder holding it (DIR itself, or one of the layout's usual sub-folders)."""
    kind, sep, folder = spec.partition(":")
    if not sep or kind not in LAYOUTS or not folder:
        raise UsageError(f"--dataset {spec!r}: expected KIND:DIR with KIND one of {', '.join(LAYOUTS)}")
    layout, root = LAYOUTS[kind], Path(folder).expanduser()
    if not root.is_dir():
        raise UsageError(f"--dataset {spec}: {root} is not a folder")
    return layout, next((c for c in (root, *(root / sub for sub in layout.nested)) if _looks_like(layout, c)), root)


def _looks_like(layout: Layout, folder: Path) -> bool:
    """Does `folder` hold (some of) the layout: a split's list or its images' top folder?"""
    return any(_listing_present(s, folder) or (folder / s.images.split("/")[0]).is_dir()
               for s in (layout.train, layout.val))


def _listing_present(split: Split, root: Path) -> bool:
    return any((root / _glob_folder(entry)).is_dir() if entry.startswith("glob:") else (root / entry).is_file()
               for entry in split.listing)


def _glob_folder(entry: str) -> str:
    return entry[5:].split("*")[0].rstrip("/")


def split_entries(layout: Layout, split: Split, root: Path, name: str) -> list[tuple[Path, Path]]:
    """(image, label) of every entry of one split, in its list's order (a glob: sorted), each checked to exist."""
    where = f"--dataset {layout.kind}:{root}"
    entry = next((e for e in split.listing if _listing_present(Split((e,), "", ""), root)), None)
    if entry is None:
        wanted = " or ".join(e[5:] if e.startswith("glob:") else e for e in split.listing)
        raise UsageError(f"{where}: no {wanted} (the {name} split); expected {layout.expects}, from {layout.download}")
    if entry.startswith("glob:"):
        prefix, _, suffix = split.images.partition("{0}")
        rows = [[_between(p.relative_to(root).as_posix(), prefix, suffix)] for p in sorted(root.glob(entry[5:]))]
    else:
        lines = (root / entry).read_text(errors="replace").splitlines()
        rows = [line.split() for line in lines if line.strip()]
        rows = [r for r in rows if not (len(r) > 1 and r[1] == "None")]  # NYUv2 lists frames without depth so
    if not rows:
        raise UsageError(f"{where}: the {name} split ({entry.removeprefix('glob:')}) lists no images")
    try:
        pairs = [(root / split.images.format(*r).lstrip("/"), root / split.labels.format(*r).lstrip("/")) for r in rows]
    except IndexError:
        raise UsageError(f"{where}: {entry} has lines with too few columns (expected '{split.images} "
                         f"{split.labels}')") from None
    for i, what in ((0, "images"), (1, "labels")):
        missing = [p[i] for p in pairs if not p[i].is_file()]
        if missing:
            raise UsageError(f"{where}: {len(missing)} of the {len(pairs)} {name} {what} listed are missing (first: "
                             f"{missing[0].relative_to(root)}); expected {layout.expects}")
    return pairs


def _between(text: str, prefix: str, suffix: str) -> str:
    return text[len(prefix):len(text) - len(suffix)]


def open_dataset(spec: str, limit: int = 0) -> EvalSet:
    """A benchmark folder as an `EvalSet`: the official train and val (test) lists, at most `limit` images of each,
    every listed file present, a sample of labels decoded and checked (ids, sizes, depth format)."""
    check_limit(limit)
    layout, root = parse_spec(spec)
    train = split_entries(layout, layout.train, root, "train")
    val = split_entries(layout, layout.val, root, layout.val_name)
    if limit:
        train, val = train[:limit], val[:limit]
    files = [p[0] for p in train + val]
    labels = [p[1] for p in train + val]
    table = lookup_table(layout.label_map, layout.ignore_index)
    common = dict(files=files, train=list(range(len(train))), val=list(range(len(train), len(files))),
                  kind=layout.kind, root=str(root), val_name=layout.val_name,
                  split_rule=f"the official {layout.title} train / {layout.val_name} lists",
                  source=dict(images=str(root), dataset=f"{layout.kind}:{root}", title=layout.title))
    if layout.task == "depth":
        check_depth(files, labels, layout.depth_scale, size=(640, 480) if layout.eval_crop else None)
        return EvalSet(depth=labels, depth_scale=layout.depth_scale, max_depth=layout.max_depth,
                       eval_crop=layout.eval_crop, **common)
    check_masks(files, labels, len(layout.classes), layout.ignore_index, label_map=table)
    return EvalSet(masks=labels, num_classes=len(layout.classes), ignore_index=layout.ignore_index, label_map=table,
                   classes=layout.classes, titles=dict(layout.titles), **common)

