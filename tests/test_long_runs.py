"""Runs that survive clusters: preemption signals, damaged checkpoints, full disks, extended runs, trackers, and run
folders from strangers (nothing in a checkpoint is unpickled)."""

from __future__ import annotations

import json
import os
import pickle
import random
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import MODEL, last_line
from conftest import phreg as run_phreg
from test_train import tiny, weights

from phreg.config.recipe import load_recipe, save_recipe
from phreg.distill.loop import distill
from phreg.errors import UsageError
from phreg.run.folder import checkpoint_dirs, damage

# `phreg` in a subprocess, optionally with hooks installed first (they stand in for a cluster's misfortunes).
LAUNCH = textwrap.dedent("""
    import os, signal, sys
    hook = os.environ.get("HOOK", "")
    if hook == "signals_while_saving":  # a second SIGTERM and a Ctrl-C while the checkpoint is being written
        import phreg.distill.checkpoints as c
        real = c.save_file
        def write(tensors, path, *a, **k):
            if path.name == "model.safetensors":
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
            return real(tensors, path, *a, **k)
        c.save_file = write
    if hook == "enospc_at_step_4":  # the disk fills up while checkpoint 4 is written
        import errno, builtins
        import phreg.distill.checkpoints as c
        def full(path, mode="r", *a, **k):
            if "step_00000004" in str(path) and "w" in mode:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return builtins.open(path, mode, *a, **k)
        c.open = full
    if hook == "no_space_check":  # let the run start on a disk too small for it
        import phreg.distill.session as session
        session.check_space = lambda needs: "not checked"
    if hook == "tiny_disk":  # the filesystem reports 50 MB free
        import shutil, collections
        usage = collections.namedtuple("usage", "total used free")
        shutil.disk_usage = lambda p: usage(10**9, 10**9 - 50 * 10**6, 50 * 10**6)
    if hook.endswith("_in_cache_build"):  # the stops come as batches of targets are written, one per batch
        import phreg.targets.cache as cache
        real_store, left = cache._store, hook.removesuffix("_in_cache_build").upper().split("_")
        def store(*a, **k):
            real_store(*a, **k)
            if left:
                os.kill(os.getpid(), getattr(signal, left.pop(0)))
        cache._store = store
    from phreg.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def phreg(*args, hook: str = "", wait: bool = True):
    """`phreg ARGS` with `hook` installed first (it stands in for a cluster's misfortune)."""
    return run_phreg(*args, launch=LAUNCH, env={"HOOK": hook}, wait=wait)


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(ln)["step"] for ln in lines if '"step"' in ln and "heldout" not in ln]


def preempt(args: list, run: Path, signum: int, after: int, hook: str = "") -> tuple[subprocess.CompletedProcess, int]:
    """Start a run, send `signum` once it has logged step `after`, wait for it to stop."""
    proc = phreg(*args, hook=hook, wait=False)
    deadline = time.monotonic() + 240
    while not (logged_steps(run) and logged_steps(run)[-1] >= after):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), after


@pytest.mark.slow
def test_a_signal_checkpoints_and_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, dinov2_file):
    """SIGTERM (plain --resume) and SIGUSR1 (--auto-resume, with a second SIGTERM and a Ctrl-C arriving while the
    checkpoint is written) at random steps: both runs end bitwise equal to one that was never stopped."""
    recipe = save_recipe(tiny(tmp_path, dinov2_file, "train.batch_size=1", "train.max_steps=12",
                              "train.save_every_minutes=0", "cache.enabled=true", "cache.plans=2"),
                         tmp_path / "recipe.yaml")
    straight, term, usr1 = tmp_path / "straight", tmp_path / "term", tmp_path / "usr1"
    done = phreg("distill", recipe, f"output_dir={straight}", "--quiet")
    assert done.returncode == 0, done.stderr
    rng = random.Random()

    stopped, after = preempt(["distill", recipe, f"output_dir={term}", "--quiet"], term, signal.SIGTERM,
                             rng.randint(1, 5))
    assert stopped.returncode == 75, stopped.stderr
    line = last_line(stopped.stderr)
    step = int(line.split("preempted at step ")[1].split()[0])
    assert after <= step < 12 and [p.name for p in checkpoint_dirs(term)] == [f"step_{step:08d}"]
    assert line.endswith(f"resume with: phreg distill {recipe} output_dir={term} --quiet --resume"), line
    assert not (term / "export").exists() and damage(checkpoint_dirs(term)[0]) is None
    again = shlex.split(line.split("resume with: ")[1])[1:]  # the command the user is told to run
    resumed = phreg(*again)
    assert resumed.returncode == 0, resumed.stderr

    args = ["distill", recipe, f"output_dir={usr1}", "--quiet", "--auto-resume"]
    stopped, after = preempt(args, usr1, signal.SIGUSR1, rng.randint(1, 5), hook="signals_while_saving")
    assert stopped.returncode == 75, stopped.stderr
    line = last_line(stopped.stderr)
    assert "by SIGUSR1" in line and line.endswith(f"resume with: phreg distill {recipe} output_dir={usr1} "
                                                  "--auto-resume --quiet"), line
    assert len(checkpoint_dirs(usr1)) == 1 and damage(checkpoint_dirs(usr1)[0]) is None
    assert phreg(*args).returncode == 0

    a = weights(straight / "export/model.safetensors")
    for run in (term, usr1):
        b = weights(run / "export/model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run
    assert phreg(*args).stdout.strip() == f"done: {usr1 / 'export'}"  # a requeue of a finished run does nothing


class Evil:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_damaged_and_planted_checkpoints_are_moved_aside_and_the_newest_valid_one_is_used(tmp_path, dinov2_file,
                                                                                         capsys):
    recipe = tiny(tmp_path, dinov2_file, "train.max_steps=3", "train.save_every=0", "train.keep_last=3",
                  "train.save_every_minutes=0.000001")  # a timed checkpoint after every step
    run = distill(recipe, quiet=True)
    step1, step2, step3 = checkpoint_dirs(run)
    assert [p.name for p in (step1, step2, step3)] == ["step_00000001", "step_00000002", "step_00000003"]
    marker = tmp_path / "pwned"
    # step 3: a pickle planted by someone who also rewrote the manifest to match
    (step3 / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Evil(marker)))
    manifest = json.loads((step3 / "manifest.json").read_text())
    manifest["files"]["custom_checkpoint_0.pkl"] = dict(bytes=(step3 / "custom_checkpoint_0.pkl").stat().st_size,
                                                       sha256="x")
    (step3 / "manifest.json").write_text(json.dumps(manifest))
    # step 2: truncated, as by a node that died during a copy
    with open(step2 / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    capsys.readouterr()
    distill(tiny(tmp_path, dinov2_file, "train.max_steps=4", "train.save_every=0", "train.keep_last=3",
                 "train.save_every_minutes=0.000001"), resume=True)
    out, err = capsys.readouterr()
    warnings = [ln for ln in err.splitlines() if ln.startswith("phreg:")]
    assert len(warnings) == 2, err
    assert warnings[0].startswith(f"phreg: warning: checkpoint {step3} is damaged (holds custom_checkpoint_0.pkl, "
                                  "which phreg never writes nor unpickles)")
    assert warnings[1].startswith(f"phreg: warning: checkpoint {step2} is damaged (model.safetensors has 1000 bytes")
    assert f"resumed from {step1} at step 1, extended to 4 steps" in out
    assert not marker.exists()
    aside = sorted(p.name.split(".")[0] for p in (run / "checkpoints").iterdir() if ".damaged-" in p.name)
    assert aside == ["step_00000002", "step_00000003"]  # kept, renamed
    assert json.loads((run / "summary.json").read_text())["steps"] == 4

    for folder in checkpoint_dirs(run):  # none valid: one line, exit code 2 (UsageError)
        (folder / "state.json").write_text("{}")
    with pytest.raises(UsageError, match="--resume: no valid checkpoint left in"):
        distill(recipe, resume=True, quiet=True)


@pytest.mark.slow
def test_resume_refuses_changed_or_missing_base_weights_in_one_line_and_ignores_a_touch(tmp_path, dinov2_file, capsys):
    """A checkpoint holds what trains; the frozen rest is the base weights file, identified by size and sha256. The
    command line, in process: a touched file (mtime only) resumes; a different file of the same shape at the same
    path, and then no file, are refused in one line with exit 2 before anything is written (export likewise)."""
    from phreg.cli import main

    base = tmp_path / "base.safetensors"
    shutil.copyfile(dinov2_file, base)
    recipe = save_recipe(tiny(tmp_path, base), tmp_path / "recipe.yaml")
    run = tmp_path / "run"
    args = ["distill", str(recipe), f"output_dir={run}", "--quiet"]
    assert main([*args, "train.max_steps=1"]) == 0

    later = base.stat().st_mtime_ns + 10**9  # the same bytes, touched (a copy, a restore from backup)
    os.utime(base, ns=(later, later))
    assert main([*args, "train.max_steps=2", "--resume"]) == 0, capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    state = json.loads((checkpoint_dirs(run)[-1] / "state.json").read_text())
    assert state["base"]["mtime_ns"] == later and state["base"]["bytes"] == base.stat().st_size
    capsys.readouterr()

    data = bytearray(base.read_bytes())
    data[-2] ^= 1  # a bit of the last tensor's last number: other weights, same shapes, same size
    base.write_bytes(bytes(data))
    assert weights(base).keys() == weights(dinov2_file).keys()
    saved = [(p.name, (p / "manifest.json").read_bytes()) for p in checkpoint_dirs(run)]
    export = (run / "export" / "model.safetensors").read_bytes()
    for argv in ([*args, "train.max_steps=3", "--resume"], [*args, "train.max_steps=3", "--auto-resume"],
                 ["export", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err
        assert err[0].startswith("phreg: error:") and f"the base weights of {MODEL} changed since" in err[0], err
        assert "sha256 was " in err[0], err[0]
    assert [(p.name, (p / "manifest.json").read_bytes()) for p in checkpoint_dirs(run)] == saved
    assert (run / "export" / "model.safetensors").read_bytes() == export

    base.unlink()
    for argv in ([*args, "train.max_steps=3", "--resume"], ["export", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(base) in err[0] and "Traceback" not in err[0], err
    assert [(p.name, (p / "manifest.json").read_bytes()) for p in checkpoint_dirs(run)] == saved


@pytest.mark.slow
def test_full_disk_is_one_line_exit_1_and_no_export(tmp_path, dinov2_file):
    """A real tmpfs where the test may mount one, with room for one checkpoint but not two (a checkpoint holds what
    trains: the unlocked tensors and their two AdamW moments), else a simulated ENOSPC; and the up-front estimate
    refusing a run that cannot fit."""
    from test_train import initial_student

    from phreg.distill.unlock import unlock

    recipe = tiny(tmp_path, dinov2_file, "train.max_steps=4", "train.save_every=2")
    trained = sum(p.numel() for g in unlock(initial_student(recipe), recipe.train.unlock, 1.0, 0.0)
                  for p in g["params"])
    disk = tmp_path / "disk"
    disk.mkdir()
    size = f"size={int(1.5 * 3 * 4 * trained) >> 10}k"
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(disk)], capture_output=True).returncode == 0
    try:
        recipe = save_recipe(recipe, tmp_path / "recipe.yaml")
        run = disk / "run"
        full = phreg("distill", recipe, f"output_dir={run}", "--quiet",
                     hook="no_space_check" if mounted else "enospc_at_step_4")
        assert full.returncode == 1, full.stderr
        line = last_line(full.stderr)
        assert line.startswith("phreg: error: No space left on device while writing checkpoint step 4 to "
                               f"{run / 'checkpoints'}"), line
        assert line.endswith("; free some space there")
        assert not (run / "export").exists() and not (run / "summary.json").exists()
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]  # no half-written step 4
        assert damage(run / "checkpoints" / "step_00000002") is None

        refused = phreg("distill", recipe, f"output_dir={disk / 'other'}", "--quiet",
                        hook="" if mounted else "tiny_disk")
        assert refused.returncode == 1, refused.stderr
        assert last_line(refused.stderr).startswith("phreg: error: not enough disk space: the run will write about ")
        assert not (disk / "other").exists()
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


def exp_lr(lr: float, end: float, t: int, total: int) -> float:
    """The paper's exponential decay, written out: lr at optimizer step t of a `total`-step plan."""
    return lr * (end / lr) ** (t / total)


def test_extending_a_run_follows_the_longer_schedule_and_trackers_log_to_tensorboard(tmp_path, dinov2_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = ["train.lr=1e-3", "train.end_lr=1e-5", "train.warmup_steps=0", "train.schedule=exp",
             "train.trackers=[tensorboard]", "train.batch_size=1", "data.val_split=0.25"]
    run = distill(tiny(tmp_path, dinov2_file, *extra, "train.max_steps=4"), quiet=True)
    with pytest.raises(UsageError, match="may only train longer"):
        distill(tiny(tmp_path, dinov2_file, *extra, "train.max_steps=8", "train.lr=2e-3"), resume=True, quiet=True)
    distill(tiny(tmp_path, dinov2_file, *extra, "train.max_steps=8", "export.dtype=bf16"), resume=True, quiet=True)
    assert json.loads((run / "export" / "config.json").read_text())["dtype"] == "bfloat16"  # the export may change
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert [r["step"] for r in rows] == list(range(1, 9))
    expected = [exp_lr(1e-3, 1e-5, t, 4) for t in range(4)] + [exp_lr(1e-3, 1e-5, t, 8) for t in range(4, 8)]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12)
    assert json.loads((run / "summary.json").read_text())["steps"] == 8

    events = EventAccumulator(str(run / "logs" / "phreg"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == list(range(1, 9))
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [e.step for e in events.Scalars("heldout/student")] == [4, 8]


def test_every_checkpoint_keeps_the_counters_of_its_step(tmp_path, dinov2_file):
    """A periodic checkpoint between log lines still records the images seen up to its step (a resumed run's
    summary counts from there)."""
    run = distill(tiny(tmp_path, dinov2_file, "train.batch_size=1", "train.max_steps=4", "train.save_every=2",
                       "train.log_every=3", "train.keep_last=5"), quiet=True)
    saved = {int(d.name[5:]): json.loads((d / "state.json").read_text())["train"] for d in checkpoint_dirs(run)}
    assert {step: s["images"] for step, s in saved.items()} == {2: 2, 4: 4}
    assert json.loads((run / "summary.json").read_text())["images_seen"] == 4


def test_resume_after_a_crash_drops_the_metrics_logged_after_the_checkpoint(tmp_path):
    from phreg.distill.resume import trim_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [dict(step=s, loss=1.0) for s in (1, 2, 3)] + [dict(heldout=dict(step=2)), dict(heldout=dict(step=3))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # torn by the crash
    trim_metrics(path, 2)
    assert [json.loads(ln) for ln in path.read_text().splitlines()] == [rows[0], rows[1], rows[3]]


def test_a_manifest_of_the_wrong_shape_is_damage_not_a_traceback(tmp_path):
    from phreg.run.folder import CHECKPOINT_FORMAT as FORMAT

    (tmp_path / "manifest.json").write_text(json.dumps(dict(format=FORMAT, files={"model.safetensors": "x"})))
    assert damage(tmp_path) == "manifest.json is not a phreg checkpoint manifest"


# `distill()` called from Python code, as a notebook, a script or a test does; SLOW_STEPS makes each step take a
# second, so that a second Ctrl-C surely lands during a step.
IN_PROCESS = textwrap.dedent("""
    import os, sys, time
    from phreg.distill import loop
    from phreg.config.recipe import load_recipe
    if os.environ.get("SLOW_STEPS"):
        real = loop.train_step
        def slow(*a, **k):
            time.sleep(1.0)
            return real(*a, **k)
        loop.train_step = slow
    try:
        loop.distill(load_recipe(sys.argv[1]), quiet=False)
    except KeyboardInterrupt as e:
        print("caught", type(e).__name__, getattr(e, "step", None), getattr(e, "checkpoint", None), flush=True)
        sys.exit(3)
    except Exception as e:
        print("caught Exception", type(e).__name__, flush=True)
        sys.exit(4)
    print("returned", flush=True)
""")


def caught(stdout: str) -> list[str]:
    """The words of IN_PROCESS's last line: what reached the caller."""
    return stdout.strip().splitlines()[-1].split()


def in_process(recipe: Path, run: Path, signals: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `IN_PROCESS` on `recipe`; once step 1 is logged, send SIGINT `signals` times, 0.3 s apart."""
    proc = subprocess.Popen([sys.executable, "-c", IN_PROCESS, str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    deadline = time.monotonic() + 240
    while not logged_steps(run):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    for i in range(signals):
        time.sleep(0.3 * bool(i))
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_ctrl_c_inside_distill_reaches_the_caller_as_keyboard_interrupt(tmp_path, dinov2_file):
    """In-process, the first Ctrl-C writes a checkpoint and reaches the caller as a KeyboardInterrupt (pytest and
    notebooks stop on it; before, phreg raised its own Exception and pytest went on with the next test); its stop line
    starts a line of its own, not the progress bar's tail; a second Ctrl-C stops at once, without a checkpoint."""
    recipe = save_recipe(tiny(tmp_path, dinov2_file, "train.batch_size=1", "train.max_steps=40",
                              "train.save_every_minutes=0"), tmp_path / "recipe.yaml")
    run = tmp_path / "run"
    once = in_process(recipe, run, 1)
    assert once.returncode == 3, once.stdout + once.stderr
    words = caught(once.stdout)
    assert words[:2] == ["caught", "Interrupted"], once.stdout
    step = int(words[2])
    assert 1 <= step < 40 and words[3] == str(run / "checkpoints" / f"step_{step:08d}")
    assert [p.name for p in checkpoint_dirs(run)] == [f"step_{step:08d}"] and damage(checkpoint_dirs(run)[0]) is None
    assert "distill:" in once.stderr, once.stderr  # the progress bar was drawn
    line = "phreg: SIGINT: stopping after this step with a checkpoint; Ctrl-C again to quit without one"
    assert line in once.stderr
    before = once.stderr.split(line)[0]
    assert before.endswith(("\n", "\r")), repr(before[-80:])  # not glued to the bar: "...it/s]phreg: SIGINT"

    again = save_recipe(load_recipe(recipe, [f"output_dir={tmp_path / 'run2'}"]), tmp_path / "recipe2.yaml")
    twice = in_process(again, tmp_path / "run2", 2, env={"SLOW_STEPS": "1"})
    assert twice.returncode == 3, twice.stdout + twice.stderr
    assert caught(twice.stdout)[:2] == ["caught", "KeyboardInterrupt"], twice.stdout  # at once: not Interrupted
    assert checkpoint_dirs(tmp_path / "run2") == []


@pytest.mark.slow
def test_ctrl_c_stops_a_pytest_session_that_runs_distill(tmp_path, dinov2_file):
    """A test runs distill in-process and Ctrl-C arrives; pytest must stop the session (exit 2, its
    '! ...Interrupted: ... !' banner), not record a failure and run the next test."""
    recipe = save_recipe(tiny(tmp_path, dinov2_file, "train.batch_size=1", "train.max_steps=40",
                              "train.save_every_minutes=0"), tmp_path / "recipe.yaml")
    tests = tmp_path / "test_user.py"
    tests.write_text(textwrap.dedent(f"""
        from phreg.distill.loop import distill
        from phreg.config.recipe import load_recipe

        def test_a():
            distill(load_recipe({str(recipe)!r}), quiet=True)

        def test_b():
            open({str(tmp_path / 'b_ran')!r}, "w").close()
    """))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 240
    while not logged_steps(tmp_path / "run"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 2, out  # pytest's "interrupted"
    assert "Interrupted: interrupted at step" in out and "failed" not in out, out  # pytest's KeyboardInterrupt banner
    assert not (tmp_path / "b_ran").exists()
    assert len(checkpoint_dirs(tmp_path / "run")) == 1


@pytest.mark.slow
def test_two_processes_never_write_one_run_folder(tmp_path, dinov2_file):
    """A double launch: `phreg distill ... RUN` and, while it trains, the same command with --auto-resume.
    The second is refused in one line naming the first (host, PID, since), exit 2, and writes nothing; `export` into
    the run and `push` are refused too, `eval`-style readers only get a note; once the first ends, the folder is free."""
    import socket

    from phreg.run.lock import hold, holder, note_if_held

    recipe = save_recipe(tiny(tmp_path, dinov2_file, "train.batch_size=1", "train.max_steps=400",
                              "train.save_every_minutes=0"), tmp_path / "recipe.yaml")
    run = tmp_path / "run"
    first = phreg("distill", recipe, f"output_dir={run}", "--quiet", wait=False)
    try:
        deadline = time.monotonic() + 240
        while not logged_steps(run):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        who = f"is being written by phreg distill on host {socket.gethostname()}, PID {first.pid}, since "
        metrics = (run / "metrics.jsonl").read_text()
        second = phreg("distill", recipe, f"output_dir={run}", "--quiet", "--auto-resume")
        assert second.returncode == 2 and who in last_line(second.stderr), second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert (run / "metrics.jsonl").read_text().startswith(metrics)  # untouched: still the first run's rows
        export = phreg("export", run)
        assert export.returncode == 2 and who in last_line(export.stderr), export.stderr
        push = phreg("push", run, "--repo-id", "alice/x", "--dry-run", tmp_path / "hub")
        assert push.returncode == 2 and "push publishes a run once it has finished" in last_line(push.stderr)
        assert not (tmp_path / "hub").exists()
        note_if_held(run, "reading it as it is")  # what eval and inspect print, and go on
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=240)
    assert first.returncode == 75, err
    assert holder(run) is None
    with hold(run, "phreg distill"):  # free again: the next writer takes it
        pass


@pytest.mark.slow
@pytest.mark.parametrize("signals", ["SIGTERM", "SIGINT", "SIGINT_SIGINT"])
def test_a_stop_while_the_target_cache_is_built_keeps_it_and_resume_continues_it(tmp_path, dinov2_file, signals):
    """A cluster's SIGTERM (exit 75), a Ctrl-C (exit 130) or two (quit at once) while the teacher targets are computed:
    the finished ones are kept, the line gives the command that continues, and that command computes only what is
    missing and trains to the same weights as a run that was never stopped."""
    recipe = save_recipe(tiny(tmp_path, dinov2_file, "train.max_steps=4", "cache.enabled=true", "cache.plans=2"),
                         tmp_path / "recipe.yaml")
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert phreg("distill", recipe, f"output_dir={straight}", "--quiet").returncode == 0
    stopped = phreg("distill", recipe, f"output_dir={run}", hook=f"{signals.lower()}_in_cache_build")
    assert stopped.returncode == (75 if signals == "SIGTERM" else 130), stopped.stderr
    line = last_line(stopped.stderr)
    assert line.endswith(f"resume with: phreg distill {recipe} output_dir={run} --resume"), line
    if signals == "SIGINT_SIGINT":
        assert line.startswith("phreg: interrupted; the target cache's finished entries are kept;"), line
        kept = None  # at least the first batch; the resumed build says how many
    else:
        assert line.startswith(f"phreg: preempted by {signals} while building the target cache, keeping "), line
        kept = int(line.split("keeping ")[1].split()[0])
        assert 1 <= kept < 8
    assert not checkpoint_dirs(run)
    again = shlex.split(line.split("resume with: ")[1])[1:]
    resumed = phreg(*again)
    assert resumed.returncode == 0, resumed.stderr
    there = int(resumed.stdout.split("continuing its build: ")[1].split()[0])
    assert there == kept if kept is not None else 1 <= there < 8, resumed.stdout
    a, b = weights(straight / "export/model.safetensors"), weights(run / "export/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    nothing = phreg("distill", recipe, f"output_dir={tmp_path / 'new'}", "--resume")
    assert nothing.returncode == 2 and last_line(nothing.stderr).endswith(
        "(and no target cache build to continue); run the same command without --resume to start")
