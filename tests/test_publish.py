"""Publishing: `phreg export`, the dry-run folder, the model card, and the one commit a stand-in Hub receives."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import MODEL, random_weights, tiny
from PIL import Image

from phreg.cli import main
from phreg.config.recipe import load_recipe
from phreg.data.scan import embedded_photos
from phreg.errors import UsageError
from phreg.files.tensorfile import load_file, read_header
from phreg.hub.export import read_metadata

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_phregTestSecret0123456789abcdefXYZ"
UPLOAD = ["README.md", "config.json", "model.safetensors", "recipe.yaml"]


@pytest.fixture(scope="session")
def run(tmp_path_factory, dinov2_file) -> Path:
    """A finished tiny run (DINOv2-S at 56 px, 4 registers, 2 steps). Shared: tests must only read it."""
    folder = tmp_path_factory.mktemp("publish") / "run"
    distill_quietly([f"output_dir={folder}", f"model.name={MODEL}", f"model.checkpoint={dinov2_file}",
                     "model.img_size=56", "model.registers=4", "views.num=2", "data.num_workers=0",
                     "train.batch_size=2", "train.max_steps=2", "train.save_every=0"])
    return folder


def tree(folder: Path) -> dict[str, str]:
    """Every entry under `folder` with the sha256 of its bytes: equal trees are byte-identical."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def light_copy(run: Path, dst: Path) -> Path:
    """A run folder for tests that add to it: its own recipe/summary, the export's files linked, no checkpoints."""
    (dst / "export").mkdir(parents=True)
    for name in ("recipe.yaml", "summary.json"):
        (dst / name).write_bytes((run / name).read_bytes())
    for name in ("model.safetensors", "config.json"):
        (dst / "export" / name).symlink_to(run / "export" / name)
    return dst


def write_eval(run: Path) -> bytes:
    """An eval report as `phreg eval` writes it (schema phreg.eval/1); returns the first figure's bytes."""
    (run / "eval").mkdir()
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (8, 4), color).save(run / "eval" / f"compare_{i}.png")
    (run / "eval" / "eval.json").write_text(json.dumps({
        "schema": "phreg.eval/1", "teacher": {"name": MODEL}, "student": {"name": str(run)}, "images": 15,
        "summary": [
            {"metric": "denoised_distance", "label": "mean 1 - cos to TTA-denoised teacher features",
             "teacher": 0.0220, "student": 0.0140, "better": "lower", "trained_images": 0},
            {"metric": "miou", "label": "linear-probe mIoU (val)", "teacher": 0.41, "student": None,
             "better": "higher"}],
        "figures": ["compare_0.png", "compare_1.png"]}))
    return (run / "eval" / "compare_0.png").read_bytes()


def dry(run: Path, out: Path, repo_id="alice/dinov2-small-reg4") -> Path:
    assert main(["push", str(run), "--repo-id", repo_id, "--dry-run", str(out)]) == 0
    return out


def card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def features(folder: Path, x: torch.Tensor) -> torch.Tensor:
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        return model.forward_features(x)


# ------------------------------------------------------------------------------------------------ export, dry run

def test_export_rebuilds_the_same_bytes_from_the_checkpoint(run, tmp_path):
    before = tree(run)
    assert main(["export", str(run), "--out", str(tmp_path / "again")]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (run / "export" / name).read_bytes(), name
    assert tree(run) == before


def test_dry_run_is_the_export_plus_recipe_and_card_and_loads_in_timm(run, tmp_path):
    before = tree(run)
    out = dry(run, tmp_path / "hub")
    assert sorted(p.name for p in out.iterdir()) == UPLOAD
    assert (out / "recipe.yaml").read_bytes() == (run / "recipe.yaml").read_bytes()
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model.num_reg_tokens == 4 and model.num_prefix_tokens == 5
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    assert (features(out, x) - features(run / "export", x)).abs().max().item() < 1e-6
    assert tree(run) == before
    dry(run, out)  # a second dry run replaces the first
    assert sorted(p.name for p in out.iterdir()) == UPLOAD


# ------------------------------------------------------------------------------------------------ the weights' dtype

def stored(path: Path) -> set[str]:
    """The dtypes of the tensors in a safetensors file, as its header says them."""
    head, _ = read_header(path)
    head.pop("__metadata__", None)
    return {spec["dtype"] for spec in head.values()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_export_dtype_bf16_overrides_the_recipe_and_loads_in_stock_timm(run, tmp_path):
    """The run's recipe says auto (fp32 frozen weights: fp32, its export); `--dtype bf16` writes every tensor as BF16,
    the header and config.json say bfloat16, the file is half the size and the same bytes on every re-export. Stock
    timm loads it into float32 holding exactly the fp32 export's values rounded to bf16, and computes the fp32
    features to a relative error under 2 x bf16's epsilon (2^-6; measured 4.8e-3 on this DINOv2-S at 56 px);
    `model.to(torch.bfloat16)` holds the file's tensors bit for bit."""
    out = tmp_path / "bf16"
    assert main(["export", str(run), "--out", str(out), "--dtype", "bf16"]) == 0
    first = tree(out)
    assert main(["export", str(run), "--out", str(out), "--dtype", "bf16"]) == 0
    assert tree(out) == first
    weights, fp32 = out / "model.safetensors", run / "export" / "model.safetensors"
    assert stored(weights) == {"BF16"} and stored(fp32) == {"F32"}
    assert read_metadata(weights)["dtype"] == "bfloat16" and read_metadata(fp32)["dtype"] == "float32"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((run / "export" / "config.json").read_text())["dtype"] == "float32"
    assert 0.49 < weights.stat().st_size / fp32.stat().st_size < 0.51
    full = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
    half = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    for (k, a), b in zip(full.state_dict().items(), half.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a.to(torch.bfloat16).float(), b), k
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = relative_error(half.forward_features(x), full.forward_features(x))
    assert 0 < error < 2 * torch.finfo(torch.bfloat16).eps, error
    on_disk = load_file(weights)
    assert all(torch.equal(t, on_disk[k]) for k, t in half.to(torch.bfloat16).state_dict().items())


@pytest.mark.parametrize("frozen,want", [("fp32", "F32"), ("bf16", "BF16")])
def test_distill_exports_in_the_dtype_of_its_frozen_weights(tmp_path, frozen, want):
    """`export.dtype: auto` at the end of a run: the dtype `speed.frozen_dtype` held the frozen weights in (a random
    2-block DINOv2-S at 28 px, one step; bf16 frozen weights train under bf16 autocast, here on the CPU)."""
    from test_memory import reduced_depth_dir

    folder = reduced_depth_dir(tmp_path / "vits_depth2", MODEL, depth=2)
    run = tmp_path / "run"
    distill_quietly(tiny(run, f"local-dir:{folder}", None, 28, f"speed.frozen_dtype={frozen}",
                         f"train.precision={frozen}", "model.registers=4", "data.val_split=0"))
    weights = run / "export" / "model.safetensors"
    assert stored(weights) == {want}
    name = {"F32": "float32", "BF16": "bfloat16"}[want]
    assert read_metadata(weights)["dtype"] == name == json.loads((run / "export" / "config.json").read_text())["dtype"]
    assert timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).num_reg_tokens == 4


def test_export_dtype_fp16_within_range_and_refused_beyond_it(run, tmp_path):
    """fp16 holds this student (relative error under 2 x fp16's epsilon, 2^-9; measured 6.9e-4). A value beyond
    fp16's 65504 is refused in one line naming the tensor, before anything is written: the earlier export stays as it
    was, no temporary folder is left (the CLI prints it, exit 2)."""
    from phreg.hub.export import export_student

    out, mean, std = tmp_path / "fp16", (0.5,) * 3, (0.5,) * 3
    student = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
    export_student(student, out, mean, std, {}, dtype=torch.float16)
    assert stored(out / "model.safetensors") == {"F16"} and read_metadata(out / "model.safetensors")["dtype"] == \
        "float16"
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = relative_error(features(out, x), student.forward_features(x))
    assert 0 < error < 2 * torch.finfo(torch.float16).eps, error
    before = tree(tmp_path)
    with torch.no_grad():
        student.blocks[3].mlp.fc1.weight[7, 5] = -2.0 ** 17
    with pytest.raises(UsageError) as e:
        export_student(student, out, mean, std, {}, dtype=torch.float16)
    said = str(e.value)
    assert said.startswith("blocks.3.mlp.fc1.weight holds 131072, beyond float16's largest value 65504") and \
        "export as bf16 or fp32" in said and "\n" not in said, said
    assert tree(tmp_path) == before
    export_student(student, out, mean, std, {}, dtype=torch.bfloat16)  # bf16 has fp32's range
    assert load_file(out / "model.safetensors")["blocks.3.mlp.fc1.weight"][7, 5].item() == -2.0 ** 17


def test_push_uploads_the_export_in_its_dtype_and_the_card_says_it(run, tmp_path):
    copy = light_copy(run, tmp_path / "run")
    assert main(["export", str(run), "--out", str(copy / "export"), "--dtype", "bf16"]) == 0
    out = dry(copy, tmp_path / "hub")
    assert (out / "model.safetensors").read_bytes() == (copy / "export" / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "| weights stored in | bfloat16 (timm copies them exactly into its float32 model; " \
           "`model.to(torch.bfloat16)` keeps them in bfloat16) |" in card(out)[1]


def test_model_card_front_matter_and_body(run, tmp_path):
    front, body = card(dry(run, tmp_path / "hub"))
    assert front["library_name"] == "timm" and front["pipeline_tag"] == "image-feature-extraction"
    assert "base_model" not in front and "license" not in front  # local weights: their own terms, not timm's
    assert "| license | not set: the weights are not the Hub checkpoint (timm lists `apache-2.0`" in body
    assert {"phreg", "registers", "image-feature-extraction", "timm"} <= set(front["tags"])
    assert "timm.create_model(\"hf-hub:alice/dinov2-small-reg4\", pretrained=True)" in body
    assert "forward_features" in body and "model.num_prefix_tokens" in body
    for fact in ("| resolution | 56 x 56 px", "| registers | 4 ", "| views per image | 2 ", "| steps | 2 ",
                 "| wall time |", "| hardware | CPU", "| weights stored in | float32 |"):
        assert fact in body, fact
    assert "## Evaluation" not in body and "eval.png" not in body


def test_local_weights_carry_no_hub_tag_or_license_in_config_json(run, tmp_path):
    """The tiny run's teacher is a local file: neither its export nor the upload's config.json claims the Hub
    checkpoint's `license: apache-2.0` / `tag: lvd142m` (the card says the licence is not set)."""
    out = dry(run, tmp_path / "hub")
    for config in (run / "export" / "config.json", out / "config.json"):
        cfg = json.loads(config.read_text())["pretrained_cfg"]
        assert "license" not in cfg and "tag" not in cfg, (config, cfg)
        assert cfg["mean"] and cfg["input_size"] == [3, 56, 56]  # the rest of the config is intact
    # an export written before this rule (with the fields) is cleaned when it is staged
    old = light_copy(run, tmp_path / "old")
    cfg = json.loads((run / "export" / "config.json").read_text())
    cfg["pretrained_cfg"].update(tag="lvd142m", license="apache-2.0")
    (old / "export" / "config.json").unlink()
    (old / "export" / "config.json").write_text(json.dumps(cfg))
    staged = json.loads((dry(old, tmp_path / "hub2") / "config.json").read_text())["pretrained_cfg"]
    assert "license" not in staged and "tag" not in staged


def test_a_run_records_the_content_of_its_training_images(run):
    """RUN/training_files.tsv: sha256, size and name of each image the run trained on (the embedded photos here), what
    eval checks its own images against."""
    rows = [ln.split("\t") for ln in (run / "training_files.tsv").read_text().splitlines() if not ln.startswith("#")]
    photos = sorted(embedded_photos().glob("*.*"))
    photos = [p for p in photos if p.suffix in (".png", ".jpg")]
    assert [r[2] for r in rows] == [p.name for p in photos]
    assert [r[0] for r in rows] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in photos]
    assert [int(r[1]) for r in rows] == [p.stat().st_size for p in photos]


def test_model_card_usage_snippet_runs(run, tmp_path):
    out = dry(run, tmp_path / "hub")
    code = re.search(r"```python\n(.*?)```", card(out)[1], re.S).group(1)
    photo = embedded_photos() / "chelsea.png"
    code = code.replace("hf-hub:alice/dinov2-small-reg4", f"local-dir:{out}").replace("image.jpg", str(photo))
    scope: dict = {}
    exec(code, scope)
    assert scope["patches"].shape == (1, 16, 384) and scope["tokens"].shape == (1, 21, 384)


def test_eval_table_and_figure_when_the_run_has_an_eval_report(run, tmp_path):
    copy = light_copy(run, tmp_path / "run")
    figure = write_eval(copy)
    out = dry(copy, tmp_path / "hub")
    assert sorted(p.name for p in out.iterdir()) == sorted(UPLOAD + ["eval.png"])
    assert (out / "eval.png").read_bytes() == figure
    front, body = card(out)
    assert front["library_name"] == "timm" and "## Evaluation" in body and "![teacher vs student](eval.png)" in body
    assert "| metric | teacher | student | better |" in body
    assert "| mean 1 - cos to TTA-denoised teacher features | 0.022 | **0.014** | lower |" in body
    assert "| linear-probe mIoU (val) | 0.41 | – | higher |" in body


def test_terminal_report_and_card_show_a_number_alike():
    """One number format (`phreg.eval.tables.number`): 4 significant digits, whole numbers with thousands separators from
    1000, a dash where nothing was measured; and one rule for the better side (green in the report, bold in the card,
    none for a tie or a missing value)."""
    from phreg.eval.report import summary_table
    from phreg.eval.tables import number
    from phreg.hub.card import eval_table

    rows = [dict(metric="gflops", label="forward GFLOPs per image", teacher=12345.6, student=0.0172249, better="lower",
                 trained_images=0),
            dict(metric="miou", label="mIoU", teacher=float("nan"), student=None, better="higher"),
            dict(metric="tie", label="tie", teacher=0.5, student=0.5 + 1e-12, better="higher")]
    html, md = summary_table(rows), eval_table(dict(summary=rows))
    assert "<td>12,346</td><td class='good'>0.01722</td>" in html
    assert "| forward GFLOPs per image | 12,346 | **0.01722** | lower |" in md  # the card used to say 1.235e+04
    assert "<td>mIoU</td><td>–</td><td class=''>–</td>" in html and "| mIoU | – | – | higher |" in md
    assert "<td>tie</td><td>0.5</td><td class=''>0.5</td>" in html and "| tie | 0.5 | 0.5 | higher |" in md
    assert [number(v, "-") for v in (12345.6, 0.0172249, None, float("inf"), 3, "n/a")] == \
        ["12,346", "0.01722", "-", "-", "3", "n/a"]


# ------------------------------------------------------------------------- the card as the record of a run

def distill_quietly(overrides: list[str]) -> None:
    """`phreg distill` in this process (quiet), Accelerate's global state reset around it."""
    from accelerate.state import AcceleratorState, GradientState

    from phreg.distill.loop import distill

    AcceleratorState._reset_state(True)
    try:
        distill(load_recipe(None, overrides), quiet=True)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def distill_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    """`phreg distill recipes/quickstart.yaml ARGS` in its own process, offline, with `env` added."""
    return subprocess.run([sys.executable, "-m", "phreg", "distill", str(REPO / "recipes" / "quickstart.yaml"),
                           *args], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                          timeout=300)


def test_card_for_local_weights_names_the_file_its_hash_and_the_data(tmp_path, dinov2_file):
    run = tmp_path / "run"
    distill_quietly(tiny(run, MODEL, dinov2_file, 56))
    front, body = card(dry(run, tmp_path / "hub", "alice/student"))
    assert "base_model" not in front  # the weights are a file, not (provably) the Hub's
    sha = hashlib.sha256(dinov2_file.read_bytes()).hexdigest()
    assert f"weights from the file `{dinov2_file.name}` (sha256 `{sha}`); local weights: not the hub checkpoint" \
        in body
    assert "the photos embedded in phreg" in body and "3 images (astronaut.png, coffee.png, rocket.jpg)" in body
    assert "| held-out set | 1 image (chelsea.png) held out" in body
    assert "**16 register tokens added after the fact**" in body and "already had" not in body
    assert "## Limitations" in body and "https://arxiv.org/abs/2505.21501" in body and "@article{" in body
    (run / "eval").mkdir()  # an eval report as `phreg eval` writes it: the card names its data and judges no timing
    (run / "eval" / "eval.json").write_text(json.dumps({
        "schema": "phreg.eval/1", "images": 67, "figures": [],
        "dataset": {"images": "/data/camvid_subset/images", "masks": "/data/camvid_subset/masks",
                    "split": "/data/camvid_subset/manifest.csv", "probe_train": 52, "probe_val": 15,
                    "split_rule": "from manifest.csv"},
        "summary": [{"metric": "images_per_s", "label": "images/s (batch 8, this machine)", "teacher": 3.05,
                     "student": 3.94, "better": "higher"}]}))
    _, body = card(dry(run, tmp_path / "hub2", "alice/student"))
    assert "Teacher vs student on 67 images from `camvid_subset/images` (`phreg eval`); linear probe trained on 52 " \
           "and scored on 15 of them (from manifest.csv), masks from `camvid_subset/masks`." in body
    assert "| images/s (batch 8, this machine) | 3.05 | 3.94 | hardware-dependent, no verdict |" in body


@pytest.mark.slow
def test_card_for_hub_weights_has_base_model_and_revision(tmp_path, dinov2_file):
    """The Hub path for real, offline: the weights sit in a huggingface_hub cache as timm would have downloaded them."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--timm--vit_small_patch14_dinov2.lvd142m"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision / "model.safetensors").symlink_to(dinov2_file)
    run = tmp_path / "run"
    out = distill_cli(*tiny(run, MODEL, None, 56), "--quiet",
                     env=dict(HF_HOME=str(tmp_path / "hf"), PHREG_CHECKPOINTS=str(tmp_path / "none")))
    assert out.returncode == 0, out.stderr
    weights = json.loads((run / "summary.json").read_text())["weights"]
    assert weights == dict(source="hub", hub_id="timm/vit_small_patch14_dinov2.lvd142m", revision=revision,
                           file="model.safetensors")
    front, body = card(dry(run, tmp_path / "hub", "alice/student"))
    assert front["base_model"] == "timm/vit_small_patch14_dinov2.lvd142m"
    assert f"at revision `{revision[:12]}` (the Hub checkpoint)" in body and "local weights" not in body


def test_card_for_a_reg4_teacher_counts_added_and_present_registers(tmp_path):
    run = tmp_path / "run"
    name = "vit_small_patch14_reg4_dinov2"
    distill_quietly(tiny(run, name, random_weights(name, tmp_path / "reg4.safetensors"), 28))
    assert json.loads((run / "summary.json").read_text())["registers"] == dict(present=4, added=16, total=20)
    _, body = card(dry(run, tmp_path / "hub", "alice/student"))
    assert "**16 register tokens added after the fact** (it already had 4: 20 in total)" in body
    assert "| registers | 16 added (init: pos_mean), 4 already in the teacher: 20 in total |" in body


@pytest.mark.parametrize("case", ["repo_id", "no_export", "bad_weights", "mismatch", "bad_eval", "inside_run",
                                  "no_token", "unfinished"])
def test_refusals_are_one_line_exit_2_and_leave_the_run_alone(run, tmp_path, capsys, monkeypatch, case):
    import huggingface_hub

    copy, repo_id, out = light_copy(run, tmp_path / "run"), "alice/reg4", str(tmp_path / "hub")
    args = ["--dry-run", out]
    message = {"repo_id": "expected OWNER/NAME", "no_export": "has no finished export",
               "bad_weights": "does not load", "mismatch": "model.safetensors does not fit config.json",
               "bad_eval": "is not a phreg eval report",
               "inside_run": "outside the run folder", "no_token": "no Hugging Face token",
               "unfinished": "has not finished: its export is of step"}[case]
    if case == "repo_id":
        repo_id = "alice/reg4/extra"
    elif case == "no_export":
        (copy / "export" / "model.safetensors").unlink()
    elif case == "bad_weights":
        (copy / "export" / "model.safetensors").unlink()
        (copy / "export" / "model.safetensors").write_bytes((run / "export" / "model.safetensors").read_bytes()[:4096])
    elif case == "mismatch":  # a config.json that asks for 5 registers
        config = (run / "export" / "config.json").read_text().replace('"reg_tokens": 4', '"reg_tokens": 5')
        (copy / "export" / "config.json").unlink()
        (copy / "export" / "config.json").write_text(config)
    elif case == "bad_eval":
        (copy / "eval").mkdir()
        (copy / "eval" / "eval.json").write_text('{"schema": "something/else"}')
    elif case == "inside_run":
        args = ["--dry-run", str(copy / "hub")]
    elif case == "unfinished":  # stopped early, its export rebuilt from a checkpoint by `phreg export`
        (copy / "summary.json").unlink()
    else:
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
        args = []
    before = tree(copy)
    capsys.readouterr()
    assert main(["push", str(copy), "--repo-id", repo_id, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("phreg: error: ") and message in err[0], err
    assert tree(copy) == before and not Path(out).exists()


# ---------------------------------------------------------------------------------------------- a stand-in Hub

class StandInHub:
    """Just the routes huggingface_hub calls to create a repo and a branch and make one commit of regular files.

    `fail(n, method, path)` may return an HTTP status to answer the n-th request (0-based) with instead.
    """

    def __init__(self, fail=lambda n, method, path: None):
        self.requests: list[dict] = []
        self.fail = fail
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.answer(self)

            def do_POST(self):
                hub.answer(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    @property
    def commits(self) -> list[dict]:
        return [r for r in self.requests if "/commit/" in r["path"]]

    def answer(self, h: BaseHTTPRequestHandler):
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        path = h.path.split("?")[0]
        self.requests.append(dict(method=h.command, path=path, auth=h.headers.get("Authorization"), body=body))
        status = self.fail(len(self.requests) - 1, h.command, path)
        if status:
            return self.send(h, status, {"error": f"stand-in failure {status}"})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
        if h.command == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            return self.send(h, 200, {"url": f"{self.url}/{req['organization']}/{req['name']}"})
        if h.command == "POST" and path == "/api/validate-yaml":
            return self.send(h, 200, {"errors": [], "warnings": []})
        if h.command == "POST" and m and m.group(2) == "branch":
            return self.send(h, 200, {})
        if h.command == "POST" and m and m.group(2) == "preupload":
            files = [dict(path=f["path"], uploadMode="regular", shouldIgnore=False, oid=None)
                     for f in json.loads(body)["files"]]
            return self.send(h, 200, {"files": files})
        if h.command == "POST" and m and m.group(2) == "commit":
            oid = hashlib.sha1(body).hexdigest()
            return self.send(h, 200, {"commitUrl": f"{self.url}/{m.group(1)}/commit/{oid}", "commitOid": oid,
                                      "pullRequestUrl": None})
        return self.send(h, 404, {"error": "not a route of the stand-in Hub"})

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, obj: dict):
        data = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def phreg_push(run: Path, endpoint: str, home: Path, *args: str, debug=False) -> subprocess.CompletedProcess:
    """`phreg push` as a user runs it, online against `endpoint`, with HF_TOKEN set (and huggingface_hub's debug
    log on stderr if `debug`)."""
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_TOKEN=TOKEN, HF_HOME=str(home), HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("HF_HUB_VERBOSITY", None)
    if debug:
        env["HF_HUB_VERBOSITY"] = "debug"
    return subprocess.run([sys.executable, "-m", "phreg", "push", str(run), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def assert_no_token(*texts: str, folders: tuple[Path, ...] = ()):
    for text in texts:
        assert TOKEN not in text and TOKEN[3:20] not in text
    for folder in folders:
        for p in folder.rglob("*"):
            assert not p.is_file() or TOKEN.encode() not in p.read_bytes(), p


@pytest.mark.slow
def test_push_is_one_commit_of_exactly_the_dry_run_folder(run, tmp_path):
    """The first request fails with 503 and is retried; then repo, branch, README check, preupload, ONE commit."""
    out = dry(run, tmp_path / "hub", repo_id="alice/reg4")
    before = tree(run)
    with StandInHub(fail=lambda n, method, path: 503 if n == 0 else None) as hub:
        result = phreg_push(run, hub.url, tmp_path / "home", "--repo-id", "alice/reg4", "--private",
                            "--revision", "dev", "--commit-message", "first student", "--retry-wait", "0.01", debug=True)
    assert result.returncode == 0, result.stderr
    assert [(r["method"], r["path"]) for r in hub.requests] == [
        ("POST", "/api/repos/create"), ("POST", "/api/repos/create"), ("POST", "/api/models/alice/reg4/branch/dev"),
        ("POST", "/api/validate-yaml"), ("POST", "/api/models/alice/reg4/preupload/dev"),
        ("POST", "/api/models/alice/reg4/commit/dev")]
    assert json.loads(hub.requests[1]["body"]) == {"name": "reg4", "organization": "alice", "visibility": "private"}
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in hub.requests)  # the token was used ...
    (commit,) = hub.commits
    lines = [json.loads(line) for line in commit["body"].decode().splitlines()]
    assert lines[0] == {"key": "header", "value": {"summary": "first student", "description": ""}}
    sent = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines[1:] if v["key"] == "file"}
    assert len(lines) == 1 + len(UPLOAD) and sorted(sent) == UPLOAD
    assert all(sent[name] == (out / name).read_bytes() for name in UPLOAD)
    assert "retrying" in result.stdout and "/commit/" in result.stdout.strip().splitlines()[-1]
    assert "authenticated: True" in result.stderr  # huggingface_hub's debug log was on
    assert_no_token(result.stdout, result.stderr, folders=(run, out, tmp_path / "home"))  # ... and never shown
    assert tree(run) == before


@pytest.mark.parametrize("status", [500, 401, None])
@pytest.mark.slow
def test_push_failure_is_one_line_nonzero_and_leaves_the_run_untouched(run, tmp_path, status):
    """500 on every call (retried, then given up), 401 (not retried), no server at all (connection refused)."""
    before = tree(run)
    hub = StandInHub(fail=lambda n, method, path: status)
    url = hub.url
    if status is None:
        hub.server.server_close()  # nothing listens there any more: connection refused
    else:
        hub.__enter__()
    try:
        result = phreg_push(run, url, tmp_path / "home", "--repo-id", "alice/reg4", "--tries", "3",
                            "--retry-wait", "0.01")
    finally:
        if status is not None:
            hub.__exit__()
    assert result.returncode == 1
    err = result.stderr.strip().splitlines()
    expected = {500: "(create repo, 3 tries): 500 Internal Server Error", 401: "(create repo): 401 Unauthorized",
                None: f"(create repo, 3 tries): cannot reach {url}"}[status]
    assert len(err) == 1 and err[0].startswith(f"phreg: error: push to alice/reg4 failed {expected}"), err
    assert "Traceback" not in result.stderr + result.stdout
    assert status != 401 or "(check HF_TOKEN" in err[0]
    assert not hub.commits and len([r for r in hub.requests if r["path"] == "/api/repos/create"]) == \
        {500: 3, 401: 1, None: 0}[status]
    assert_no_token(result.stdout, result.stderr, folders=(run, tmp_path / "home"))
    assert tree(run) == before
