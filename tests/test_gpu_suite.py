"""benchmarks/gpu_suite.py: each part in its own process under a hard time box, a JSON that keeps what was measured,
and a dry run whose models sit on the `meta` device, so that a device mix the GPU would hit raises here too."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def _suite():
    import gpu_suite

    return gpu_suite


def test_gpu_suite_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    env.pop("PHREG_GPU_SUITE_DRY", None)
    out = tmp_path / "suite.json"
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), str(out)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines() == ["gpu_suite: no CUDA GPU on this machine; nothing measured"]
    assert not out.exists()


# ---------------------------------------------------------------------------------------- the meta placement
def _meta_models(views: int = 2):
    """A 2-block DINOv2-S teacher and its student on `meta`, the reference step around them, and phreg's denoised
    teacher (auto chunk), as the dry run places them; the data stays on the CPU."""
    import timm
    from reference import ReferenceStep

    from phreg.backbones import add_registers
    from phreg.config.recipe import ViewsCfg, load_recipe
    from phreg.targets.teacher import DenoisedTeacher

    teacher = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=2, img_size=56).eval()
    student = add_registers(teacher, 2)
    teacher, student = teacher.to("meta"), student.to("meta")
    ref = ReferenceStep(teacher, student, ["reg_token"], torch.zeros(3), load_recipe(None, []).train)
    targets = DenoisedTeacher(teacher, ViewsCfg(num=views), (0.5,) * 3, (0.2,) * 3).to("meta")
    return ref, targets


def test_reference_step_runs_where_its_models_are():
    """The loader makes views and index maps on the CPU; the reference step moves them to its models' device. With
    the models on `meta` and the data on the CPU (as on a GPU), the whole step runs: a CPU tensor meeting a model
    tensor would raise here as it does on a GPU. Its read-backs (NaN checks, loss.item()) are skipped on meta."""
    import math

    from meta_device import meta_allowances

    ref, _ = _meta_models()
    images, plans = torch.randn(2, 3, 56, 56), torch.tensor([[[0, 0, 0], [1, -1, 1]]] * 2)
    feats, index = ref.teacher_features(images, plans)
    assert feats.device.type == index.device.type == "meta"
    assert feats.shape == (4, 4, 4, 384) and index.shape == (4, 2, 4, 4)
    with meta_allowances():
        target = ref.targets(images, plans)
        assert target.device.type == "meta" and target.shape == (2, 16, 384)
        assert math.isnan(ref.step(images, plans))
    assert ref.params[0].grad.device.type == "meta"


def test_meta_placement_catches_the_cpu_copy_that_crashed_the_gpu_run():
    """bench_distill compares the reference's targets with phreg's. The comparison that crashed on an H200 ("Expected
    all tensors to be on the same device, cuda:0 and cpu") copied one side to the CPU; on meta models with CPU data it
    raises here too, and so does a CPU tensor meeting a model tensor, while the comparison bench_distill makes now
    (both on the models' device) and its FLOP count (CPU images, read by the student on its device) run."""
    import bench_distill
    from meta_device import meta_allowances

    ref, targets = _meta_models()
    x, p = torch.randn(2, 3, 56, 56), torch.tensor([[[0, 0, 0], [1, -1, 1]]] * 2)  # where the loader makes them
    with meta_allowances():
        target = targets(x.to("meta"), p.to("meta"))  # phreg's targets, on the models' device
        assert target.device.type == "meta" and target.shape == (2, 16, 384)
        with pytest.raises(NotImplementedError, match="meta tensor"):
            (ref.targets(x, p) - target.float().cpu()).abs().max()  # the old comparison, written out
        with pytest.raises(RuntimeError, match="device"):
            ref.targets(x, p) - torch.zeros(2, 16, 384)  # a model-device tensor meeting a CPU one
        gap = (ref.targets(x, p) - target.float()).abs().max()  # bench_distill's comparison now
        assert gap.device.type == "meta"
        flops = bench_distill.flops_per_image(ref, x, p)
    assert flops["teacher"] > 0 and flops["student"] > 0


def test_the_dry_runs_step_runs_on_meta_with_fused_adamw_and_nothing_read_back():
    """The fresh-view step on meta as the dry run builds it: fused AdamW (let onto meta for the block only) takes
    its update with the non-finite flag on the device; outside the block, fused AdamW on meta is refused as before."""
    from meta_device import meta_allowances

    from phreg.distill.step import skip_if_nonfinite

    param = torch.nn.Parameter(torch.empty(8, device="meta"))
    optimizer = torch.optim.AdamW([param], fused=True)
    param.grad = torch.empty(8, device="meta")
    with meta_allowances():
        found_inf = skip_if_nonfinite(optimizer, torch.nn.utils.clip_grad_norm_([param], 1.0))
        optimizer.step()
    assert found_inf.device.type == "meta" and optimizer.state[param]["exp_avg"].device.type == "meta"
    other = torch.nn.Parameter(torch.empty(8, device="meta"))
    other.grad = torch.empty(8, device="meta")
    with pytest.raises(RuntimeError, match="fused=True"):
        torch.optim.AdamW([other], fused=True).step()


# ---------------------------------------------------------------------------------------- the runner
def _part(tmp_path: Path, name: str, body: str) -> list[str]:
    """A stand-in part: a Python process (no torch: it starts in a blink) whose JSON goes to tmp_path/NAME.json."""
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, signal, subprocess, sys, time
        def emit(**kv):
            json.dump(kv, open({str(tmp_path / (name + '.json'))!r}, "w"))
    """) + textwrap.dedent(body))
    return [sys.executable, str(script)]


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("hang", ["busy loop", "sleep in C"])
def test_a_part_past_its_budget_is_killed_with_its_group_even_when_it_ignores_signals(tmp_path, hang):
    """SIGALRM and SIGTERM ignored, a child in a process group of its own (as a `phreg distill` run inside a part),
    a hang that never returns to Python: the part is still cut at its budget (SIGKILL to every process of its session
    after the grace), its child dies with it, and what it emitted before stays in the suite's JSON."""
    suite = _suite()
    pidfile = tmp_path / "child.pid"
    cmd = _part(tmp_path, "hung", f"""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], process_group=0)
        open({str(pidfile)!r}, "w").write(str(child.pid))
        emit(first_phase={{"images_per_s": 12.5}})
        if {hang == "busy loop"!r}:
            while True:
                pass
        import ctypes
        ctypes.CDLL(None).sleep(60)
    """)
    out, result = tmp_path / "suite.json", {}
    t0 = time.perf_counter()
    status = suite.run_part(result, out, "hung", cmd, 1.5, tmp_path / "hung.json", tmp_path / "hung.log", grace=0.5)
    took = time.perf_counter() - t0
    assert status["status"] == "cut" and status["budget_s"] == 1.5
    assert 1.5 <= took < 4.0, took
    saved = json.loads(out.read_text())
    assert saved["hung"] == {"first_phase": {"images_per_s": 12.5}}
    assert saved["parts"]["hung"]["status"] == "cut"
    child = int(pidfile.read_text())
    deadline = time.time() + 2
    while _alive(child) and time.time() < deadline:  # reaped by init once its parent is gone
        time.sleep(0.05)
    assert not _alive(child)


def test_the_json_keeps_every_part_ok_cut_or_failed_and_the_table_says_which(tmp_path, capsys):
    """Parts run one after another: one finishes, one overruns, one fails (its error line recorded), a dotted one
    lands nested; the JSON holds all of them after each, and the final table gives each one's status."""
    suite = _suite()
    out, result = tmp_path / "suite.json", dict(dry_run=True, budget_total_s=6.0)
    parts = [("loader", 2.0, "emit(fresh={'images_per_s': 100.0}, cached={'images_per_s': 400.0}, "
                             "build={'images_per_s': 50.0}, workers=8)"),
             ("bench", 1.0, "emit(phases={'step': {'images_per_s': 90.0}})\ntime.sleep(30)"),
             ("memory.giant", 2.0, "1 / 0"),
             ("levers.sdpa", 1.0, "emit(rows={'flash': {'off': 'default', 'teacher_views_per_s': "
                                  "{'off': 10.0, 'on': 12.0, 'ratio': 1.2}}})")]
    for name, budget, body in parts:
        suite.run_part(result, out, name, _part(tmp_path, name, body), budget, tmp_path / f"{name}.json",
                       tmp_path / f"{name}.log", grace=0.2)
        assert name in json.loads(out.read_text())["parts"]  # written after each part
    saved = json.loads(out.read_text())
    assert [saved["parts"][n]["status"] for n, *_ in parts] == ["ok", "cut", "error", "ok"]
    assert saved["loader"]["cached"] == {"images_per_s": 400.0}
    assert saved["bench"] == {"phases": {"step": {"images_per_s": 90.0}}}  # measured before the cut
    assert saved["parts"]["memory.giant"]["error"] == "ZeroDivisionError: division by zero"
    assert saved["levers"]["sdpa"]["rows"]["flash"]["teacher_views_per_s"]["ratio"] == 1.2
    suite.print_table(dict(saved, wall_s=5.0))
    table = capsys.readouterr().out.splitlines()
    lines = {ln.split()[0]: ln for ln in table if ln.split() and ln.split()[0] in saved["parts"]}
    assert lines["loader"].split()[1] == "ok" and "cached 400.0" in lines["loader"]
    assert "cut at 1 s" in lines["bench"] and "90.0" in lines["bench"]
    assert lines["memory.giant"].split()[1] == "error" and "ZeroDivisionError" in lines["memory.giant"]
    assert "flash: teacher 1.2x" in lines["levers.sdpa"]


def test_a_part_that_raises_records_its_error_and_where(tmp_path, monkeypatch):
    """Inside a part's process: an exception is written into the part's JSON (type, message, traceback tail) with
    what was emitted before it, and the exit code is 1."""
    suite = _suite()

    def broken(ctx):
        ctx.emit(teacher={"views_per_s": 3.0})
        raise RuntimeError("Expected all tensors to be on the same device, cuda:0 and cpu\nmore")

    monkeypatch.setitem(suite.BY_NAME, "broken", suite.Part("broken", 1, 1, "cpu", broken))
    args = suite.argparse.Namespace(part="broken", dry_run=True, work=str(tmp_path), json=str(tmp_path / "b.json"),
                                    deadline=time.time() + 10, suite=None)
    assert suite.part_process(args) == 1
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["teacher"] == {"views_per_s": 3.0}
    assert saved["error"] == "RuntimeError: Expected all tensors to be on the same device, cuda:0 and cpu"
    assert any("broken" in line for line in saved["where"])


def test_budgets_fit_eight_minutes_and_parts_are_chosen_by_name():
    suite = _suite()
    assert sum(p.budget for p in suite.PARTS) <= 450
    assert sum(p.budget for p in suite.PARTS) + suite.GRACE_S * len(suite.PARTS) + 10 < 8 * 60  # + start-up
    assert [p.name for p in suite.PARTS][:2] == ["inputs", "bench"]
    assert {p.name for p in suite.PARTS} >= {"bench", "loader", "distill", "sync_check", "projection",
                                            "levers.frozen_dtype", "levers.sdpa", "levers.compile_mode",
                                            "levers.chunk", "levers.fp8", "memory.large", "memory.giant"}
    assert [p.name for p in suite.selected("bench,levers")] == ["bench", "levers.frozen_dtype", "levers.sdpa",
                                                                 "levers.chunk", "levers.compile_mode", "levers.fp8"]
    with pytest.raises(SystemExit, match="no part lever"):
        suite.selected("lever")


def test_steady_rate_leaves_out_warm_up_and_projection_follows_the_rates(tmp_path):
    suite = _suite()
    metrics = tmp_path / "metrics.jsonl"
    rows = [dict(step=5, loss=1.0, elapsed_s=60.0), dict(step=10, loss=0.9, elapsed_s=61.0),  # compiled in row 1
            dict(step=15, loss=0.8, elapsed_s=62.0), dict(step=20, loss=0.7, elapsed_s=63.0), dict(heldout={})]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert suite.steady_rate(metrics, batch=8, skip=1) == 15 * 8 / 3.0
    assert suite.steady_rate(metrics, batch=8, skip=2) == 10 * 8 / 2.0
    assert suite.steady_rate(tmp_path / "absent.jsonl", batch=8) is None
    teachers = dict(teacher=dict(images_per_s=110.0), teacher_compiled=dict(images_per_s=150.0))
    measured = dict(distill=dict(fresh_eager=dict(images_per_s=100.0), fresh_compiled=dict(images_per_s=120.0),
                                 cached=dict(images_per_s=600.0, compiled=True, cache_s=9.0, cache_images=256)),
                    bench=dict(phases=teachers), loader=dict(build=dict(images_per_s=400.0)))
    p = suite.projection(measured, plans=4)
    image_steps = 31_783 * 100
    assert p["fresh_hours"] == dict(eager=round(image_steps / 100 / 3600, 2),
                                    compiled=round(image_steps / 120 / 3600, 2))
    assert p["fresh_met"] is (image_steps / 120 / 3600 <= 7.5)
    build_h = 4 * 31_783 / 150 / 3600  # the compiled teacher (150/s) is slower than the writer (400/s)
    assert p["cache_build_hours"] == round(build_h, 2)
    assert p["cached_hours"] == round(build_h + image_steps / 600 / 3600, 2)
    assert p["cached_met"] is (build_h + image_steps / 600 / 3600 <= 2.0)
    measured["loader"]["build"]["images_per_s"] = 100.0  # now the writer bounds the build
    assert suite.projection(measured, plans=4)["cache_build_hours"] == round(4 * 31_783 / 100 / 3600, 2)
    assert suite.mfu(100.0, 3737.0, 989.0) == round(100 * 3.737 / 989, 3)


@pytest.mark.slow
def test_the_dry_run_runs_every_part_and_fills_the_json(tmp_path):
    """`PHREG_GPU_SUITE_DRY=1 bash benchmarks/gpu_suite.sh`: every part ok in its own process (models on meta where
    they can be), every figure the GPU run reports present (values meaningless), the closing table, within 4 min."""
    env = dict(os.environ, PYTHON=sys.executable, PHREG_GPU_SUITE_DRY="1")
    out = tmp_path / "dry.json"
    t0 = time.perf_counter()
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), str(out)], env=env, capture_output=True,
                       text=True, timeout=600)
    took = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["dry_run"] is True
    assert {n: s["status"] for n, s in d["parts"].items()} == {part: "ok" for part in d["budgets_s"]}, \
        {n: s.get("error") for n, s in d["parts"].items()}
    assert set(d["bench"]["phases"]) == {"teacher", "teacher_compiled", "student", "student_compiled", "step",
                                         "reference", "step_compiled"}
    assert d["bench"]["device"].startswith("meta")
    assert d["distill"]["fresh_eager"]["status"] == d["distill"]["cached"]["status"] == "ok"
    assert d["distill"]["cached"]["images_per_s"] > 0 and "cache_s" in d["distill"]["cached"]
    assert {"fresh", "build", "cached"} <= set(d["loader"])
    assert "fresh_hours" in d["projection"] and "cached_hours" in d["projection"]
    assert d["sync_check"] == {"fresh_views": "no host sync in 3 steps", "cached_targets": "no host sync in 3 steps"}
    for lever in ("frozen_dtype", "sdpa", "chunk", "compile_mode"):
        rows = d["levers"][lever]["rows"]
        assert rows and all({"teacher_views_per_s", "step_images_per_s"} <= set(r) for r in rows.values()), lever
        assert all(r["teacher_views_per_s"]["ratio"] > 0 for r in rows.values())
    assert set(d["levers"]["sdpa"]["rows"]) == {"flash", "cudnn", "efficient"}
    fp8 = d["levers"]["fp8"]
    assert fp8 == {"skipped": "torchao not installed"} if fp8.get("skipped") else "rows" in fp8
    assert d["memory"]["large"]["peak_mb"] > 0 and d["memory"]["giant"]["parameters_m"] > 0
    table = p.stdout[p.stdout.index("\ngpu_suite dry run:"):]
    assert all(f"\n{name} " in table for name in d["parts"])
    assert took < 4 * 60, took


@pytest.mark.slow
def test_the_float8_lever_measures_a_quantized_copy_and_leaves_the_students_weights(tmp_path, monkeypatch):
    """levers.fp8 with torchao's API stood in (torchao is not installed here; where it is, the GPU run uses it), tiny
    on the CPU (bf16 weights need autocast, which meta lacks): the quantized teacher is a copy built beside the rig's,
    so the student keeps the bf16 tensors it shares with its teacher; the copy is measured against the bf16 teacher
    on the same batch, with the cosine similarity of their targets and the keep flag."""
    import importlib.machinery
    import types

    suite = _suite()
    quantized = []
    fake = types.ModuleType("torchao")
    fake.__spec__ = importlib.machinery.ModuleSpec("torchao", None)
    fake_q = types.ModuleType("torchao.quantization")
    fake_q.quantize_ = lambda model, config: quantized.append(model)
    fake_q.Float8DynamicActivationFloat8WeightConfig = lambda granularity: ("float8", granularity)
    fake_q.PerRow = lambda: "per-row"
    monkeypatch.setitem(sys.modules, "torchao", fake)
    monkeypatch.setitem(sys.modules, "torchao.quantization", fake_q)

    built, build = [], suite.Rig.build
    monkeypatch.setattr(suite.Rig, "build", classmethod(lambda cls, *a, **k: built.append(build(*a, **k)) or built[-1]))

    ctx = suite.Ctx(dict(suite.DRY), tmp_path, tmp_path / "fp8.json", True, torch.device("cpu"), time.time() + 60)
    suite.part_fp8(ctx)
    d = json.loads((tmp_path / "fp8.json").read_text())
    assert set(d["rows"]["float8"]) == {"off", "teacher_views_per_s", "step_images_per_s"}
    assert d["rows"]["float8"]["off"] == "bf16"
    assert d["targets_cosine"]["mean"] > 0.9999  # the stand-in quantizes nothing: the same targets
    assert d["keep"] is (d["rows"]["float8"]["teacher_views_per_s"]["ratio"] > 1)
    (model,), (rig,) = quantized, built
    qkv = lambda m: m.blocks[0].attn.qkv.weight  # noqa: E731
    assert qkv(model).dtype == torch.bfloat16  # quantized from the bf16 weights
    assert qkv(rig.parts.student).data_ptr() == qkv(rig.parts.targets.teacher).data_ptr() != qkv(model).data_ptr()
