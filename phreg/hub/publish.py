"""Publish a finished run on the Hugging Face Hub, loadable with `timm.create_model('hf-hub:OWNER/NAME')`.

`stage` builds the exact folder that is uploaded: the run's export (`model.safetensors`, `config.json`), its resolved
`recipe.yaml`, a model card `README.md`, and `eval.png` when the run has an eval report. `--format transformers` puts
the student as transformers' `Dinov2WithRegistersModel` in the export's place (`hub/transformers.py`), `--format both`
beside it in `transformers/` (timm only reads a repository's root). `--dry-run DIR` writes that folder and stops;
`push` sends it as ONE commit through huggingface_hub's public API. The token is left to huggingface_hub
(`HF_TOKEN`, then the cached login) and never handed to anything that prints or writes.
The run folder is only ever read.
"""

from __future__ import annotations

import http
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import safetensors

from .. import __version__
from ..errors import UsageError
from ..files.atomic import atomic_dir, replaceable
from ..run.folder import (CONFIG, EVAL, EXPORT, RECIPE, SUMMARY, TEXT_FILE, WEIGHTS, checkpoint_step, finished,
                          latest_checkpoint, require_run)
from .card import CARD, FIGURE, Run, model_card
from .export import read_metadata, without_origin
from .transformers import FILES as TRANSFORMERS_FILES, PROCESSOR, SUBFOLDER

FILES = (WEIGHTS, CONFIG, RECIPE, CARD, FIGURE, TEXT_FILE, PROCESSOR)
FORMATS = ("timm", "transformers", "both")
EVAL_SCHEMA = "phreg.eval/"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The Hub's rules for one path segment: letters, digits, '-', '_', '.', no '--' or '..', no leading/trailing '-'/'.'.
NAME = r"(?!.*(?:--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID = re.compile(rf"{NAME}/{NAME}")


class PushError(RuntimeError):
    """The Hub refused or could not be reached (after retries): one line, exit code 1. Never carries the token."""


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id):
        raise UsageError(f"--repo-id {repo_id!r}: expected OWNER/NAME (letters, digits, '-', '_', '.'), "
                         "e.g. alice/dinov2-small-reg4")
    return repo_id


def read_run(run: str | Path) -> Run:
    """Check that `run` holds a finished export that loads in stock timm, and gather what the card says."""
    from ..config.recipe import load_recipe, recipe_hash

    run = require_run(run)
    export = run / EXPORT
    missing = [n for n in (WEIGHTS, CONFIG) if not (export / n).is_file()]
    if missing:
        raise UsageError(f"{run} has no finished export ({export / missing[0]} is missing); finish the run with "
                         f"`phreg distill {run / RECIPE} output_dir={run} --resume` (a finished run whose export "
                         f"was removed: `phreg export {run}`)")
    import timm  # only now: the cheap checks above answer in a fraction of a second

    from ..backbones import backbone
    from ..models.loading import error_summary

    try:  # what timm's strict load checks, without reading the weights: the architecture on "meta", the header
        metadata = read_metadata(export / WEIGHTS)  # a truncated or foreign file fails here
        config = json.loads((export / CONFIG).read_text())
        student = timm.create_model(f"local-dir:{export}", pretrained=False, device="meta")
        with safetensors.safe_open(str(export / WEIGHTS), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors, JSON and timm raise many types
        raise rebuild(run, f"the export in {export} does not load: {error_summary(e)}") from None
    wanted = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    if shapes != wanted:
        key = sorted(set(shapes) ^ set(wanted)) or [k for k in wanted if shapes[k] != wanted[k]]
        raise rebuild(run, f"the export in {export} does not load: {WEIGHTS} does not fit {CONFIG} (first "
                           f"difference: {key[0]})")
    recipe = load_recipe(run / RECIPE)
    if metadata.get("recipe_hash") not in (None, recipe_hash(recipe)):
        raise rebuild(run, f"{export / WEIGHTS} was made from another recipe than {run / RECIPE} (hash "
                           f"{metadata['recipe_hash']} vs {recipe_hash(recipe)})")
    summary = _read_json(run / SUMMARY) if (run / SUMMARY).is_file() else None
    if not finished(run):  # `phreg export` of a stopped run, or a run resumed to train longer
        said = "no summary.json" if summary is None else f"summary.json says step {summary.get('steps')}"
        newest = latest_checkpoint(run)
        if summary is not None and newest is not None and str(checkpoint_step(newest)) != metadata.get("steps"):
            said += f", its newest checkpoint is of step {checkpoint_step(newest)}"
        raise UsageError(f"{run} has not finished: its export is of step {metadata.get('steps')}, {said}; finish "
                         f"the run with `phreg distill {run / RECIPE} output_dir={run} --resume` before publishing")
    family, init = backbone(student), recipe.model.register_init
    unlocked = summary.get("unlocked")  # what the run trained; runs before phreg recorded it: resolve the recipe
    if unlocked is None:
        unlocked = [[names, g.lr_scale] for g in recipe.train.unlock if (names := family.resolve(g.params))]
    geometry = dict(family.geometry(), unlocked=[(list(names), scale) for names, scale in unlocked],
                    init=family.default_init() if init == "auto" else init)  # what `auto` resolved to
    report, figure = read_eval(run / EVAL)
    return Run(run, recipe, summary, config, metadata, geometry, report, figure)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return data


def read_eval(folder: Path) -> tuple[dict | None, Path | None]:
    """`RUN/eval/eval.json` (schema phreg.eval/1) and its first figure, or (None, None) when the run has no eval."""
    path = folder / "eval.json"
    if not path.is_file():
        return None, None
    report = _read_json(path)
    rows = report.get("summary")
    if not str(report.get("schema", "")).startswith(EVAL_SCHEMA) or not isinstance(rows, list) or \
            not all(isinstance(r, dict) and "metric" in r for r in rows):
        raise UsageError(f"{path} is not a phreg eval report (expected schema {EVAL_SCHEMA}1 with a summary list); "
                         "rerun `phreg eval`")
    figures = report.get("figures") or []
    if not figures:
        return report, None
    figure = (folder / str(figures[0])).resolve()
    if not figure.is_relative_to(folder.resolve()) or not figure.is_file():
        raise UsageError(f"{path}: figure {figures[0]!r} is not a file inside {folder}; rerun `phreg eval`")
    with open(figure, "rb") as f:
        if f.read(8) != PNG_MAGIC:
            raise UsageError(f"{path}: figure {figures[0]!r} is not a PNG image")
    return report, figure


# ------------------------------------------------------------------------------------------------ staging, upload

def stage(run: Run, repo_id: str, folder: Path, fmt: str = "timm") -> list[str]:
    """Fill `folder` with exactly what is uploaded; returns the file paths relative to it.

    `fmt`: timm (the export), transformers (the export converted, in its place) or both (timm's at the root, where
    timm reads it; transformers' in `transformers/`, loaded with `subfolder="transformers"`)."""
    converted = None
    if fmt in ("transformers", "both"):  # first: a family transformers cannot represent is refused before any copy
        from .transformers import stage_transformers

        converted = stage_transformers(run.path / EXPORT, folder if fmt == "transformers" else folder / SUBFOLDER,
                                       run.path)
        converted["subfolder"] = SUBFOLDER if fmt == "both" else None
    if fmt != "transformers":
        shutil.copyfile(run.path / EXPORT / WEIGHTS, folder / WEIGHTS)
        if local_weights(run) and run.config != without_origin(run.config):  # exported before phreg dropped them
            (folder / CONFIG).write_text(json.dumps(without_origin(run.config), indent=2))
        else:
            shutil.copyfile(run.path / EXPORT / CONFIG, folder / CONFIG)
        if (run.path / EXPORT / TEXT_FILE).is_file():
            shutil.copyfile(run.path / EXPORT / TEXT_FILE, folder / TEXT_FILE)
    shutil.copyfile(run.path / RECIPE, folder / RECIPE)
    (folder / CARD).write_text(model_card(run, repo_id, transformers=converted, timm=fmt != "transformers"))
    if run.figure is not None:
        shutil.copyfile(run.figure, folder / FIGURE)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def local_weights(run: Run) -> bool:
    """Was the teacher a local file (summary.json's weights record), so that the Hub checkpoint's tag and license
    are not this upload's."""
    return ((run.summary or {}).get("weights") or {}).get("source") in ("file", "local-dir")


def dry_run(run: str | Path, repo_id: str, out: str | Path, fmt: str = "timm") -> list[str]:
    """Write the upload folder to `out` (atomically) and upload nothing."""
    repo_id, out, path = check_repo_id(repo_id), Path(out), Path(run)
    if out.resolve().is_relative_to(path.resolve()) or path.resolve().is_relative_to(out.resolve()):
        raise UsageError(f"--dry-run {out}: choose a folder outside the run folder {path} (it is never modified)")
    if not replaceable(out, set(FILES), folders={SUBFOLDER: set(TRANSFORMERS_FILES)}):
        raise UsageError(f"--dry-run {out} exists and is not an earlier dry run; choose a new folder")
    info = read_run(run)
    with atomic_dir(out) as tmp:
        names = stage(info, repo_id, tmp, fmt)
    return names


def _transient(e: BaseException) -> bool:
    """Worth another try: connection problems, timeouts, HTTP 408/429/5xx. Never offline mode or a 4xx."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return False
    if isinstance(e, HfHubHTTPError):
        status = getattr(e.response, "status_code", 0) or 0
        return status in (408, 429) or status >= 500
    names = {c.__name__ for c in type(e).__mro__}  # httpx's TransportError, requests' ConnectionError / Timeout
    return isinstance(e, (ConnectionError, TimeoutError)) or bool(names & {"TransportError", "Timeout"})


def _cause(e: BaseException, endpoint: str, secret: str | None) -> str:
    """One line saying why, with the token (should a server ever echo it) blanked out."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        text = "HF_HUB_OFFLINE is set; unset it to push"
    elif isinstance(e, HfHubHTTPError) and getattr(e.response, "status_code", None):
        status = e.response.status_code
        try:
            text = f"{status} {http.HTTPStatus(status).phrase}"
        except ValueError:
            text = f"HTTP {status}"
        if e.server_message:
            text += f": {e.server_message.strip().splitlines()[0][:200]}"
        if status in (401, 403):
            text += " (check HF_TOKEN or `hf auth login`, and that the token may write to this repo)"
    elif _transient(e):
        text = f"cannot reach {endpoint}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    else:
        text = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return text.replace(secret, "***") if secret else text


def push(run: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, endpoint: str | None = None, tries: int = 4, wait: float = 2.0,
         say=print, fmt: str = "timm") -> str:
    """Create the repo if missing, then upload the staged folder as one commit; returns the commit URL.

    Each Hub call is retried on transient errors, waiting `wait`, 2 `wait`, 4 `wait`, ... seconds. Retrying the
    commit is safe: files that reached the Hub are recognised by their hash and not committed twice.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    repo_id = check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint)  # no token argument: huggingface_hub finds it (HF_TOKEN, cached login)
    try:
        secret = get_token()
    except Exception:  # e.g. a failed OIDC exchange; huggingface_hub reports it again on the first call
        secret = None
    if not secret:  # before the run is read (timm): the commonest mistake answers at once
        raise UsageError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or try --dry-run DIR first)")
    info = read_run(run)
    where = api.endpoint or constants.ENDPOINT

    def call(what: str, fn):
        for attempt in range(1, tries + 1):
            try:
                return fn()
            except Exception as e:  # anything the Hub or the network throws ends as one line
                if attempt == tries or not _transient(e):
                    again = f", {attempt} tries" if attempt > 1 else ""
                    raise PushError(f"push to {repo_id} failed ({what}{again}): {_cause(e, where, secret)}") from None
                pause = wait * 2 ** (attempt - 1)
                say(f"{what}: {_cause(e, where, secret)}; retrying in {pause:g} s ({attempt}/{tries - 1})")
                time.sleep(pause)

    steps = info.metadata.get("steps", "?")
    message = commit_message or (f"phreg {__version__}: {info.recipe.model.name} + {info.geometry['registers']} "
                                 f"registers, {steps} steps")
    with tempfile.TemporaryDirectory(prefix="phreg-push-") as tmp:
        names = stage(info, repo_id, Path(tmp), fmt)
        call("create repo", lambda: api.create_repo(repo_id, private=True if private else None, exist_ok=True))
        if revision and revision != "main" and not revision.startswith("refs/"):
            call("create branch", lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
        commit = call("commit", lambda: api.create_commit(
            repo_id, operations=[CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(Path(tmp) / n)) for n in names],
            commit_message=message, revision=revision))
    say(f"pushed {', '.join(names)} to {repo_id}" + (f"@{revision}" if revision else ""))
    return getattr(commit, "commit_url", None) or f"{where}/{repo_id}"


def rebuild(run: Path, why: str) -> UsageError:
    """An export that cannot be published as it is: why, and the command that writes it again."""
    return UsageError(f"{why}; rebuild it with `phreg export {run}`")
