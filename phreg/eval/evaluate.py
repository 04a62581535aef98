"""`phreg eval`: what distillation changed, teacher vs student, on the same images, seeds and view plans.

eval.json (schema "phreg.eval/1") holds everything; its `summary` is a list of rows {metric, label, teacher,
student, better} that the report, the model card (`phreg push`) and people read first.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import __version__
from .analysis import Analysis, analyze, to_rgb
from .figures import norm_histogram, panels
from ..files import write_json
from .inspection import load_images, verdict
from ..backbones import backbone, patch_tokens
from ..fastpath import eager_attention
from ..models import Loaded
from .probe import confusion, fit_probe, load_masks, scores, split_indices, squashed_images
from ..recipe import ViewsCfg
from .report import write_report

SCHEMA = "phreg.eval/1"


def cost(loaded: Loaded, device, batch: int = 8, repeats: int = 3) -> dict:
    """Parameters, forward FLOPs per image (attention counted through timm's eager path) and images/s."""
    model = loaded.model.to(device).eval()
    x = torch.randn(1, 3, loaded.img_size, loaded.img_size, device=device)
    # the CPU SDPA kernel is invisible to the FLOP counter; eager attention is the same math
    with eager_attention(model), FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_features(x)
    xb = x.expand(batch, -1, -1, -1).contiguous()
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            model.forward_features(xb)
            if device != "cpu" and torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return dict(params=sum(p.numel() for p in model.parameters()), gflops=counter.get_total_flops() / 1e9,
                images_per_s=batch / statistics.median(times[1:]), batch=batch)


@torch.no_grad()
def probe(teacher: Loaded, student: Loaded, files, masks_dir, num_classes, ignore_index, split, device) -> dict:
    masks = load_masks(files, masks_dir, num_classes, ignore_index)
    train, val = split_indices(files, split)
    out = dict(train_images=len(train), val_images=len(val), num_classes=num_classes, ignore_index=ignore_index)
    for role, loaded in (("teacher", teacher), ("student", student)):
        x = squashed_images(files, loaded.img_size, loaded.mean, loaded.std)
        grid = backbone(loaded.model).grid
        feats = torch.cat([patch_tokens(loaded.model, b.to(device)).float().cpu() for b in x.split(8)])
        feats = feats.transpose(1, 2).reshape(len(files), -1, *grid)
        with torch.enable_grad():
            head = fit_probe(feats[train], [masks[i] for i in train], num_classes, ignore_index,
                             progress=f"{role}: linear probe")
        out[role] = scores(confusion(head, feats[val], [masks[i] for i in val], num_classes, ignore_index))
    return out


def evaluate(student: Loaded, teacher: Loaded, images_dir, out: Path, views: int = 10, limit: int = 0,
             pictures: int = 8, seed: int = 0, masks: str | None = None, num_classes: int | None = None,
             ignore_index: int | None = None, split: str | None = None, device="cpu", zeroshot: dict | None = None) -> dict:
    """`zeroshot`: classes, text_tower, settings, heads, sigma (see `phreg.clip.run.evaluate_zeroshot`); needs masks."""
    start = time.perf_counter()
    timings: dict[str, float] = {}
    clock = [start]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 1)
        clock[0] = now

    files, images = load_images(images_dir, student, limit)
    lap("images")
    vcfg = ViewsCfg(num=views)
    a_t: Analysis = analyze(teacher, images, vcfg, seed, pictures=pictures, device=device)
    lap("teacher")
    a_s: Analysis = analyze(student, images, vcfg, seed, pictures=pictures, device=device)
    lap("student")
    s_t, s_s = a_t.summary(), a_s.summary()
    t_thr = s_t["outliers"]["threshold"]  # judge the student by the teacher's own data-derived threshold
    judged = a_s.outliers(t_thr if t_thr != float("inf") else None)
    judged.pop("mask")
    dist_s = a_t.tta.distances(student.model)
    result = dict(
        schema=SCHEMA, phreg_version=__version__, seconds=None, images=len(files), img_size=student.img_size,
        views=views, seed=seed, files=[str(f) for f in files],
        dataset=dict(images=str(images_dir), masks=str(masks) if masks else None, split=str(split) if split else None,
                     limit=limit),
        teacher=dict(name=teacher.name, inspect=s_t, verdict=verdict(s_t)),
        student=dict(name=student.name, inspect=s_s, verdict=verdict(s_s), outliers_at_teacher_threshold=judged),
        denoised_distance=dict(teacher=a_t.tta.teacher_distance, student=dist_s.mean().item(),
                               per_image_teacher=a_t.tta.teacher_distances.tolist(),
                               per_image_student=dist_s.tolist()),
        high_norm_mass=_mass(a_t, a_s, t_thr),
        cls_cosine=(torch.nn.functional.cosine_similarity(a_t.cls_final, a_s.cls_final, dim=-1).mean().item()
                    if a_t.cls_final is not None and a_s.cls_final is not None else None),
        cost=dict(teacher=cost(teacher, device), student=cost(student, device)),
    )
    lap("distances and cost")
    if masks and num_classes is not None:  # the linear probe, when asked for (--num-classes)
        result["probe"] = probe(teacher, student, files, masks, num_classes, ignore_index, split, device)
        lap("probe")
        _, val = split_indices(files, split)
        d = result["denoised_distance"]
        d["val_images"] = len(val)
        result["dataset"].update(probe_train=result["probe"]["train_images"], probe_val=len(val),
                                 split_rule=f"from {Path(split).name}" if split else "every 4th image is val")
        d["val_teacher"] = a_t.tta.teacher_distances[val].mean().item()
        d["val_student"] = dist_s[val].mean().item()
    out.mkdir(parents=True, exist_ok=True)
    if zeroshot is not None:
        from ..clip.run import evaluate_zeroshot

        z = zeroshot
        gt = load_masks(files, masks, z["classes"].num_labels, ignore_index)
        result["zeroshot"] = evaluate_zeroshot(teacher, student, files, gt, z["classes"], z["text_tower"],
                                               z["settings"], z["heads"], z["sigma"], ignore_index, out,
                                               min(pictures, 4), device)
    result["summary"] = summary_rows(result)
    vmax = max(float(m["norm"].max()) for a in (a_t, a_s) for m in a.maps) if a_t.maps else None
    figures = [panels(to_rgb(images[i], student.mean, student.std), [("teacher", mt), ("student", ms)],
                      out / f"compare_{i}.png", vmax).name for i, (mt, ms) in enumerate(zip(a_t.maps, a_s.maps))]
    figures.append(norm_histogram([("teacher", a_t.norms[a_t.artifact_layer]),
                                   ("student", a_s.norms[a_s.artifact_layer])], out / "norm_histogram.png",
                                  t_thr).name)
    result["figures"] = figures
    lap("pictures")
    result["timings"] = timings
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out / "eval.json", result)
    write_report(result, out / "report.html")
    return result


def _mass(a_t: Analysis, a_s: Analysis, threshold: float) -> dict:
    """Where the high norms live: per token kind, the mean norm and the share of the summed squared norm."""
    def shares(a: Analysis) -> dict:
        kinds = a.norms[a.artifact_layer]
        sq = {k: float((v.float() ** 2).sum()) for k, v in kinds.items() if v.numel()}
        total = sum(sq.values())
        return {k: dict(mean_norm=float(kinds[k].float().mean()), squared_norm_share=sq[k] / total,
                        above_teacher_threshold=float((kinds[k] > threshold).float().mean()))
                for k in sq}
    return dict(layer=a_t.artifact_layer, teacher=shares(a_t), student=shares(a_s))


def summary_rows(r: dict) -> list[dict]:
    t_in, s_in = r["teacher"]["inspect"], r["student"]["inspect"]
    thr = t_in["outliers"]["threshold"]
    rows = [
        dict(metric="denoised_distance", label="mean 1 - cos to TTA-denoised teacher features",
             teacher=r["denoised_distance"]["teacher"], student=r["denoised_distance"]["student"], better="lower"),
        *([dict(metric="denoised_distance_val",
                label=f"  same, val images only ({r['denoised_distance']['val_images']})",
                teacher=r["denoised_distance"]["val_teacher"], student=r["denoised_distance"]["val_student"],
                better="lower")] if "val_images" in r["denoised_distance"] else []),
        dict(metric="tta_noise", label="own TTA noise (mean 1 - cos, raw vs own denoised)",
             teacher=t_in["tta_noise"]["mean_1_minus_cos"], student=s_in["tta_noise"]["mean_1_minus_cos"],
             better="lower"),
        dict(metric="outlier_fraction",
             label=("high-norm patch tokens (teacher's threshold %.0f)" % thr) if thr != float("inf")
             else "high-norm patch tokens (own rule; teacher has none)",
             teacher=t_in["outliers"]["fraction"], student=r["student"]["outliers_at_teacher_threshold"]["fraction"],
             better="lower"),
        dict(metric="max_norm_ratio", label="max / median patch norm, last block", better="lower",
             teacher=t_in["outliers"]["max_over_median"], student=s_in["outliers"]["max_over_median"]),
    ]
    if r["cls_cosine"] is not None:
        rows.append(dict(metric="cls_cosine", label="CLS token cosine to the teacher's", teacher=1.0,
                         student=r["cls_cosine"], better="higher"))
    if "probe" in r:
        p = r["probe"]
        rows += [dict(metric="miou", label=f"linear-probe mIoU ({p['val_images']} val images)",
                      teacher=p["teacher"]["miou"], student=p["student"]["miou"], better="higher"),
                 dict(metric="pixel_accuracy", label="linear-probe pixel accuracy", teacher=p["teacher"]["pixel_accuracy"],
                      student=p["student"]["pixel_accuracy"], better="higher")]
    if "zeroshot" in r:
        z = r["zeroshot"]
        rows.append(dict(metric="zeroshot_miou",
                         label=f"zero-shot mIoU ({z['images']} images; teacher {z['teacher']['head']}, "
                               f"student {z['student']['head']})",
                         teacher=z["teacher"]["miou"], student=z["student"]["miou"], better="higher"))
    c = r["cost"]
    rows += [dict(metric="gflops", label="forward GFLOPs per image", teacher=c["teacher"]["gflops"],
                  student=c["student"]["gflops"], better="lower"),
             # measured once on whatever machine ran eval, next to other work: a speed, not a verdict
             dict(metric="images_per_s", label=f"images/s (batch {c['teacher']['batch']}, this machine)",
                  teacher=c["teacher"]["images_per_s"], student=c["student"]["images_per_s"], better=None,
                  note="hardware-dependent")]
    return rows
