"""`make experiments`: the paper's comparison rows as DVC experiments of this pipeline, and one table of them.

Each experiment is the committed pipeline with a few params overridden (``dvc exp run -n NAME -S ++key=value``):

* Table 4 (components): GeoCLIP fine-tuned (App. F.4, ``phase1.kind=geoclip_finetune``); DINOv2 alone without and
  with TempGeo (``phase1.model.frame.backbones=[dino]``, ``tempgeo_layers=0``); CLIP + DINOv2 + TempGeo (the
  baseline's Phase I answer) and the full model with GeoRefiner (the baseline's final answer).
* GeoCLIP zero-shot (App. F.1, the Tables 1-2 baseline, ``phase1.kind=geoclip_zero_shot``): only with real CLIP
  ViT-L/14 features; on the demo's tiny random backbones the row says so and nothing runs.
* Table 5 (gallery resolution 1 / 0.5 / 0.1 km), Table 7 (alpha 1 / 10 / 100, beta 1, on the paper-literal refiner: Eqs. 2-5 and embedding outputs) and Table 10 (training
  sequences of 4 / 8 / 16 frames in both phases).
* Table 6's CLIP + SigLIP row (``backbone.dino.kind=open_clip``: an open_clip tower in the second slot).
* The demo's additions to Fig. 5 (a per-frame expert and smoothing, README "Trajectory shape") stay on in every
  row but those whose model already sees each frame alone (the DINOv2 row without TempGeo, GeoCLIP), so that rows
  compare like with like; three rows take them off again, evaluation only: Fig. 5 as published, expert only,
  smoothing only.
* Beyond the paper (App. L): argmax and Viterbi answers side by side, the 1 km gallery with local refinement (and
  with the candidates re-ranked by their refined scores, ``eval.refine_rerank``), and
  the baseline trained from two more seeds (``phase1.seed``, ``phase2.seed``; toy world and features unchanged),
  so that a difference between rows can be read against the spread of one run of the demo.

An experiment whose overrides equal the committed params is the baseline itself and is not run twice. The
experiments run one after another in the workspace (``dvc exp run``, not ``--queue``/``--temp``): the feature
store is not in the DVC cache (``cache: false``), so a temporary copy of the repository would extract every
feature again. Before each one the workspace is reset to the baseline experiment (``dvc exp apply``), so each
re-runs only the stages its params touch.

What takes the time (2 CPU cores, the embedded demo; each figure is the stages the experiment re-runs):
the baseline nothing after `make demo` (else the whole pipeline, ~4.5 min); each gallery row (Table 5) the
gallery and evaluation, under a minute; each alpha row (Table 7) Phase II and evaluation, ~2.5 min; each
sequence-length row (Table 10) and each DINOv2 row (Table 4) both training phases and evaluation, ~3.5 min;
GeoCLIP fine-tuned Phase I and evaluation, ~1.5 min; each seed row both phases and evaluation, ~4 min; plus ~15 s
of DVC bookkeeping per experiment, and about 70 s more for each refinement row: 51-55 minutes in all (2026-12-07). On real data every row that re-runs Phase I is a full training run (Appendix A).

Resumable: a finished experiment (same name on this commit, same params, metrics present) is skipped, so an
interrupted `make experiments` re-run picks up where it stopped, and the experiment that was interrupted resumes
its training from the stage's checkpoint. The table (``metrics/experiments.csv`` and ``.md``) is written
atomically from ``dvc exp show --json`` at the end, and alone with ``--collect-only``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vidtag.errors import VidtagError

REPO = Path(__file__).resolve().parent.parent
PARAMS = "params.yaml"
EVAL_JSON = "metrics/eval.json"
STATE_FILE = Path(".dvc/tmp/vidtag-experiments.json")  # which experiment ran last, for resuming in place
BASELINE = "paper-baseline"
CODE_DIRS = ("vidtag/", "pipeline/")  # where a stage's code deps live (dvc.yaml, pipeline/deps.py)


@dataclass(frozen=True)
class Experiment:
    """One DVC experiment: the committed params with ``overrides`` (``key=value``, value in YAML) applied."""

    name: str  # DVC experiment name (unique per commit)
    overrides: tuple[str, ...] = ()  # dotted params keys and YAML values, e.g. "phase2.alpha=1"
    needs_real_clip: bool = False  # GeoCLIP zero-shot: only on real CLIP ViT-L/14 features


STAGES = ("final", "phase1", "final_viterbi", "phase1_viterbi")  # the answers of eval.json a row can report


@dataclass(frozen=True)
class Row:
    """One row of a paper table: which experiment it is and which of eval.json's answers it reports."""

    table: str  # "Table 4", ...
    label: str  # the paper's row
    experiment: str | None  # Experiment.name; None: not available in this pipeline (``note`` says why)
    stage: str = "final"  # STAGES: "final" (Fig. 5's answer) | "phase1" (Fig. 5's first stage: the model without
    # GeoRefiner) | "final_viterbi" | "phase1_viterbi" (the same answers decoded over their top-K, eval.json's compare group)
    note: str = ""


# The committed demo adds a per-frame expert and smoothing to Fig. 5 (README "Trajectory shape"). A model that sees
# each frame alone already (no TempGeo, or GeoCLIP's image head) has nothing for an expert to add: its rows go without.
NO_EXPERT = ("phase1.frame_expert=false", "eval.expert_weight=0")

EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(BASELINE),
    Experiment("paper-t5-gallery-1km", ("gallery.resolution_km=1.0",)),
    Experiment("paper-t5-gallery-0.5km", ("gallery.resolution_km=0.5",)),
    Experiment("paper-t5-gallery-0.1km", ("gallery.resolution_km=0.1",)),
    Experiment("paper-t7-alpha-1", ("phase2.loss=hinge", "phase2.refiner.output=embedding", "phase2.alpha=1.0", "phase2.beta=1.0")),
    Experiment("paper-t7-alpha-10", ("phase2.loss=hinge", "phase2.refiner.output=embedding", "phase2.alpha=10.0", "phase2.beta=1.0")),
    Experiment("paper-t7-alpha-100", ("phase2.loss=hinge", "phase2.refiner.output=embedding", "phase2.alpha=100.0", "phase2.beta=1.0")),
    Experiment("paper-t10-seq-4", ("phase1.seq_len=4", "phase2.seq_len=4")),
    Experiment("paper-t10-seq-8", ("phase1.seq_len=8", "phase2.seq_len=8")),
    Experiment("paper-t10-seq-16", ("phase1.seq_len=16", "phase2.seq_len=16")),
    Experiment("paper-t4-dino", ("phase1.model.frame.backbones=[dino]", "phase1.model.frame.tempgeo_layers=0", *NO_EXPERT)),
    Experiment("paper-t4-dino-tempgeo", ("phase1.model.frame.backbones=[dino]",)),
    Experiment("paper-t6-clip-siglip", ("backbone.dino.kind=open_clip",)),
    Experiment("beyond-gallery-1km-refine", ("gallery.resolution_km=1.0", "eval.refine=true")),
    # refinement as the issue first read it: candidates re-scored by their best lattice point and re-sorted (vidtag.refine)
    Experiment("beyond-gallery-1km-refine-rerank", ("gallery.resolution_km=1.0", "eval.refine=true", "eval.refine_rerank=true")),
    # The same pipeline trained from other seeds (features and toy world unchanged): how far one run of the demo is
    # from another, so that a difference between rows, or between argmax and Viterbi, can be read against it.
    # the same trained models, answered without the expert's scores and/or without smoothing (evaluation only)
    Experiment("beyond-fig5", ("eval.expert_weight=0", "eval.smooth_frames=0")),
    Experiment("beyond-expert-only", ("eval.smooth_frames=0",)),
    Experiment("beyond-smoothing-only", ("eval.expert_weight=0",)),
    Experiment("beyond-seed-1", ("phase1.seed=1", "phase2.seed=1")),
    Experiment("beyond-seed-2", ("phase1.seed=2", "phase2.seed=2")),
    Experiment("paper-geoclip-finetune", ("phase1.kind=geoclip_finetune", *NO_EXPERT)),
    Experiment("paper-geoclip-zero-shot", ("phase1.kind=geoclip_zero_shot", *NO_EXPERT), needs_real_clip=True),
)

ROWS: tuple[Row, ...] = (
    Row("Table 4", "GeoCLIP fine-tuned (CLIP, frames as images; App. F.4)", "paper-geoclip-finetune"),
    Row("Table 4", "DINOv2", "paper-t4-dino", "phase1"),
    Row("Table 4", "DINOv2 + TempGeo", "paper-t4-dino-tempgeo", "phase1"),
    Row("Table 4", "CLIP + DINOv2 + TempGeo", BASELINE, "phase1"),
    Row("Table 4", "CLIP + DINOv2 + TempGeo + GeoRefiner (VidTAG)", BASELINE),
    Row("Tables 1-2", "GeoCLIP zero-shot (App. F.1)", "paper-geoclip-zero-shot"),
    Row("Table 5", "gallery 1 km", "paper-t5-gallery-1km"),
    Row("Table 5", "gallery 0.5 km", "paper-t5-gallery-0.5km"),
    Row("Table 5", "gallery 0.1 km", "paper-t5-gallery-0.1km"),
    Row("Table 6", "CLIP + DINOv2", BASELINE, "phase1"),
    Row("Table 6", "CLIP + SigLIP", "paper-t6-clip-siglip", "phase1",
        note="on the demo both slots hold tiny random towers: the row runs Table 6's plumbing (an open_clip tower "
             "in the second slot, features re-extracted), not a comparison of SigLIP with DINOv2"),
    Row("Table 7", "alpha 1, beta 1", "paper-t7-alpha-1"),
    Row("Table 7", "alpha 10, beta 1", "paper-t7-alpha-10"),
    Row("Table 7", "alpha 100, beta 1", "paper-t7-alpha-100"),
    Row("Table 10", "4 frames", "paper-t10-seq-4"),
    Row("Table 10", "8 frames", "paper-t10-seq-8"),
    Row("Table 10", "16 frames", "paper-t10-seq-16"),
    # Beyond the paper (App. L's own limits): temporal decoding over each frame's top-K, and local refinement
    # that makes a coarse gallery precise (vidtag.decode, vidtag.refine).
    Row("Beyond (App. L)", "Phase I, per-frame argmax", BASELINE, "phase1"),
    Row("Beyond (App. L)", "Phase I + Viterbi", BASELINE, "phase1_viterbi"),
    Row("Beyond (App. L)", "final, per-frame argmax", BASELINE),
    Row("Beyond (App. L)", "final + Viterbi", BASELINE, "final_viterbi"),
    Row("Beyond (App. L)", "final, Fig. 5 as published (no expert, no smoothing)", "beyond-fig5"),
    Row("Beyond (App. L)", "Phase I, Fig. 5 as published", "beyond-fig5", "phase1"),
    Row("Beyond (App. L)", "final, per-frame expert, no smoothing", "beyond-expert-only"),
    Row("Beyond (App. L)", "final, smoothing, no expert", "beyond-smoothing-only"),
    Row("Beyond (App. L)", "gallery 1 km", "paper-t5-gallery-1km"),
    Row("Beyond (App. L)", "gallery 1 km + Viterbi", "paper-t5-gallery-1km", "final_viterbi"),
    Row("Beyond (App. L)", "gallery 1 km + local refinement", "beyond-gallery-1km-refine"),
    Row("Beyond (App. L)", "gallery 1 km + local refinement + Viterbi", "beyond-gallery-1km-refine", "final_viterbi"),
    Row("Beyond (App. L)", "gallery 1 km + local refinement, cells re-ranked by their refined scores",
        "beyond-gallery-1km-refine-rerank"),
    Row("Beyond (App. L)", "gallery 0.1 km", "paper-t5-gallery-0.1km"),
    *(Row("Beyond (App. L)", f"{what}, training seed {seed}", f"beyond-seed-{seed}", reads)
      for seed in (1, 2) for what, reads in (("Phase I, per-frame argmax", "phase1"), ("Phase I + Viterbi", "phase1_viterbi"),
                                             ("final, per-frame argmax", "final"), ("final + Viterbi", "final_viterbi"))),
)


class ExperimentsError(VidtagError):
    """A reason `make experiments` cannot go on, printed as one line."""


# ----------------------------------------------------------------------------- params and the plan


def parse_override(override: str) -> tuple[list[str], Any]:
    """``"a.b=[x]"`` -> (["a", "b"], ["x"]): the dotted key and the YAML value, as DVC (Hydra) reads them."""
    key, sep, value = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ExperimentsError(f"override {override!r} is not key=value")
    return key.split("."), yaml.safe_load(value)


def apply_overrides(params: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``params`` with each override set (missing sections created, as ``-S ++key=value`` does); a copy."""
    out = copy.deepcopy(params)
    for override in overrides:
        keys, value = parse_override(override)
        node = out
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return out


@dataclass(frozen=True)
class Found:
    """One experiment revision ``dvc exp show --json`` lists."""

    name: str
    rev: str  # the experiment's commit
    baseline: str  # the commit it was run on
    params: dict[str, Any] | None  # its params.yaml
    metrics: dict[str, Any] | None  # its metrics/eval.json
    error: str | None
    code: dict[str, str | None]  # its dvc.lock's md5 of each code dep (vidtag/, pipeline/)


def parse_exp_show(data: list[dict[str, Any]]) -> list[Found]:
    """``dvc exp show --json`` -> the experiments it lists, newest commit first (as DVC lists them)."""
    out: list[Found] = []
    for baseline in data or []:
        for group in baseline.get("experiments") or []:
            for rev in (group.get("revs") or [])[:1]:  # the newest revision of the name
                d = rev.get("data") or {}
                metrics = (d.get("metrics") or {}).get(EVAL_JSON) or {}
                error = rev.get("error") or metrics.get("error")
                code = {path: (dep or {}).get("hash") for path, dep in (d.get("deps") or {}).items()
                        if path.startswith(CODE_DIRS)}
                out.append(Found(str(rev.get("name") or group.get("name")), str(rev.get("rev")), str(baseline.get("rev")),
                                 ((d.get("params") or {}).get(PARAMS) or {}).get("data"), metrics.get("data"),
                                 None if error is None else str(error.get("msg", error) if isinstance(error, dict) else error),
                                 code))
    return out


def reusable(found: Found, params: dict[str, Any], code: dict[str, str]) -> bool:
    """Whether ``found`` holds what running the experiment now would give: finished with metrics, the same params,
    and every code dep as it is now (DVC's run-cache rule, which cannot serve the training stages: their
    checkpoint outputs are ``persist``). So a finished experiment of an earlier commit still counts when the
    commits in between changed nothing the pipeline runs."""
    return not found.error and bool(found.metrics) and found.params == params and found.code == code


@dataclass
class Planned:
    """What to do for one experiment."""

    experiment: Experiment
    runs_as: str  # the experiment whose results it reads (itself, or the baseline when its params are the baseline's)
    status: str  # "done" | "pending" | "stale" (this commit has one of that name that does not count: run with -f) | "skipped"
    found: Found | None = None  # its results, when done
    note: str = ""


def plan(experiments: Sequence[Experiment], baseline_params: dict[str, Any], found: Sequence[Found],
         code: dict[str, str], head: str, unavailable: str | None) -> list[Planned]:
    """Each experiment's status. ``found``: what ``dvc exp show`` lists; ``code``: md5 of each code dep now;
    ``unavailable``: why GeoCLIP zero-shot cannot run on these features (None when it can)."""
    out = []
    for exp in experiments:
        want = apply_overrides(baseline_params, exp.overrides)
        runs_as = BASELINE if exp.name != BASELINE and want == baseline_params else exp.name
        if exp.needs_real_clip and unavailable:
            out.append(Planned(exp, runs_as, "skipped", note=unavailable))
            continue
        hit = next((f for f in found if f.name == runs_as and reusable(f, want, code)), None)
        note = "the committed params: the baseline's run" if runs_as != exp.name else ""
        if hit is not None:
            if hit.baseline != head:
                note = (note + "; " if note else "") + f"run on commit {hit.baseline[:7]} with the same code and params"
            out.append(Planned(exp, runs_as, "done", hit, note))
        elif runs_as == exp.name and any(f.name == exp.name and f.baseline == head for f in found):
            out.append(Planned(exp, runs_as, "stale", note="this commit's run has other params or code, or no metrics"))
        else:
            out.append(Planned(exp, runs_as, "pending", note=note))
    return out


# ----------------------------------------------------------------------------- the table


def _threshold(col: str) -> float:
    m = re.search(r"acc_([0-9.]+)km$", col)
    return float(m.group(1)) if m else math.inf


def stage_metrics(metrics: dict[str, Any], stage: str) -> dict[str, float]:
    """The numbers of one of eval.json's answers, flat: ``frame_acc_1km``, ``video_median_km``, ``dfd_km``,
    ``shape_path_length_ratio``, ... (``stage`` "phase1": Fig. 5's first stage, eval.json's ``phase1`` group;
    "*_viterbi": that answer decoded, eval.json's ``compare.viterbi`` group, already flat)."""
    out: dict[str, float] = {}
    decoder, answer = ("viterbi", stage.removesuffix("_viterbi")) if stage.endswith("_viterbi") else ("argmax", stage)
    compared = ((metrics.get("compare") or {}).get(decoder) or {}).get(answer) or {}  # flat: frame_acc_1km, ...
    out.update({k: float(v) for k, v in compared.items() if isinstance(v, (int, float))})  # the groups below agree
    src = metrics if stage == "final" else (metrics.get("phase1") or {}) if stage == "phase1" else {}
    for group, prefix in (("frame", "frame_"), ("video", "video_"), ("trajectory", ""), ("shape", "shape_"),
                          ("city", "city_"), ("city_frame", "city_frame_")):
        values = src.get(group)
        if isinstance(values, dict):
            out.update({f"{prefix}{k}": float(v) for k, v in values.items() if isinstance(v, (int, float))})
    for k in ("n_sequences", "n_frames"):
        if isinstance(metrics.get(k), (int, float)):
            out[k] = float(metrics[k])
    if isinstance((metrics.get("cost") or {}).get("gallery_points"), (int, float)):
        out["n_gallery_points"] = float(metrics["cost"]["gallery_points"])
    return out


LEAD_COLUMNS = ["table", "row", "experiment", "rev", "reads", "status", "overrides", "note"]


def _metric_order(col: str) -> tuple:
    groups = ["frame_acc", "frame_median_km", "video_acc", "video_median_km", "dfd_km", "mrd_km", "dfd_deg", "mrd_deg",
              "shape_", "city_", "n_"]
    rank = next((i for i, g in enumerate(groups) if col.startswith(g)), len(groups))
    return rank, _threshold(col), col


def build_table(rows: Sequence[Row], planned: Sequence[Planned]) -> list[dict[str, Any]]:
    """One dict per paper row: the lead columns and every metric of its answer."""
    by_name = {p.experiment.name: p for p in planned}
    table = []
    for row in rows:
        rec: dict[str, Any] = {"table": row.table, "row": row.label, "reads": row.stage, "note": row.note, "overrides": "",
                               "experiment": "", "rev": ""}
        p = by_name.get(row.experiment) if row.experiment else None
        if p is None:
            rec["status"] = "not available" if row.experiment is None else "not planned"
            table.append(rec)
            continue
        rec.update(overrides=" ".join(p.experiment.overrides), experiment=p.runs_as,
                   note="; ".join(n for n in (row.note, p.note) if n))
        if p.status == "done" and p.found is not None:
            rec.update(status="done", rev=p.found.rev[:7])
            rec.update(stage_metrics(p.found.metrics or {}, row.stage))
        else:
            rec["status"] = {"skipped": "skipped", "stale": "not run", "pending": "not run"}.get(p.status, p.status)
        table.append(rec)
    return table


def _columns(table: Sequence[dict[str, Any]]) -> list[str]:
    metrics = sorted({k for rec in table for k in rec if k not in LEAD_COLUMNS}, key=_metric_order)
    return LEAD_COLUMNS + metrics


def to_csv(table: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(table), lineterminator="\n")
    writer.writeheader()
    for rec in table:
        writer.writerow({k: ("" if v is None else v) for k, v in rec.items()})
    return buf.getvalue()


MD_ACC_KM = (0.5, 1.0, 5.0, 25.0)  # the paper's thresholds (Sec. 4.3); the CSV has every one eval.json holds


def _fmt(v: Any, digits: int) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def to_markdown(table: Sequence[dict[str, Any]]) -> str:
    """One section per paper table; accuracies in percent, distances in km, the trajectory shape of App. E."""
    cols = _columns(table)
    frame_acc = [c for c in cols if c.startswith("frame_acc_") and _threshold(c) in MD_ACC_KM]
    video_acc = [c for c in cols if c.startswith("video_acc_") and _threshold(c) in (1.0, 5.0)]

    def km(c: str) -> str:
        t = _threshold(c)
        return f"{t:g} km"

    spec = ([(c, f"frame acc@{km(c)}", 1) for c in frame_acc] + [("frame_median_km", "frame median (km)", 2)]
            + [(c, f"video acc@{km(c)}", 1) for c in video_acc] + [("video_median_km", "video median (km)", 2),
               ("dfd_km", "DFD (km)", 2), ("mrd_km", "MRD (km)", 2), ("shape_path_length_ratio", "path-length ratio", 2),
               ("shape_r2_in_drive", "R2 in drive", 2), ("shape_distinct_cells", "distinct cells", 1),
               ("frames_off_25km_pct", "frames > 25 km off (%)", 1), ("n_gallery_points", "gallery points", 0)])
    lines = ["# The paper's comparison rows on this pipeline's data", "",
             "Written by `make experiments` (pipeline/experiments.py) from `dvc exp show --json`; every number is in "
             "`metrics/experiments.csv` with the experiment that made it. *reads*: `final` is Fig. 5's answer, `phase1` "
             "its first stage (the model without GeoRefiner).", ""]
    for name in dict.fromkeys(rec["table"] for rec in table):
        lines += [f"## {name}", "", "| row | experiment | reads | " + " | ".join(h for _, h, _ in spec) + " | status |",
                  "|---|---|---|" + "---:|" * len(spec) + "---|"]
        for rec in (r for r in table if r["table"] == name):
            status = rec["status"] + (f": {rec['note']}" if rec.get("note") else "")
            cells = [_fmt(rec.get(c), d) for c, _, d in spec]
            lines.append(f"| {rec['row']} | {rec['experiment'] or '–'} | {rec['reads']} | " + " | ".join(cells) + f" | {status} |")
        lines.append("")
    return "\n".join(lines)


def write_tables(table: Sequence[dict[str, Any]], csv_path: Path, md_path: Path) -> None:
    from vidtag.io import write_text_atomic

    write_text_atomic(csv_path, to_csv(table))
    write_text_atomic(md_path, to_markdown(table))


# ----------------------------------------------------------------------------- running


def _env() -> dict[str, str]:
    """DVC runs stage commands as ``python``: this interpreter's bin folder first on PATH makes that ours."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _run(args: Sequence[str], *, capture: bool = False, binary: bool = False):
    proc = subprocess.run(list(args), cwd=REPO, env=_env(), text=not binary,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace") if binary else (proc.stderr or "")
        tail = err.strip().splitlines()[-1:] if capture else []
        raise ExperimentsError(f"`{' '.join(map(str, args))}` failed (exit {proc.returncode})" + (f": {tail[0]}" if tail else ""))
    return proc.stdout if capture else ""


def _dvc(*args: str, capture: bool = False) -> str:
    return _run([sys.executable, "-m", "dvc", *args], capture=capture)


SHOW_COMMITS = 30  # `dvc exp show -n`: how far back finished experiments are looked for (~0.3 s a commit)


def list_experiments() -> list[Found]:
    return parse_exp_show(json.loads(_dvc("exp", "show", "--json", "--no-fetch", "-n", str(SHOW_COMMITS), capture=True) or "[]"))


def stages() -> dict[str, Any]:
    return (yaml.safe_load((REPO / "dvc.yaml").read_text()) or {}).get("stages") or {}


def _out_paths(stage: dict[str, Any], *, untracked_by_dvc: bool) -> list[str]:
    paths = []
    for key in ("outs", "metrics", "plots"):
        for out in stage.get(key) or []:
            path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            opts = opts or {}
            if not untracked_by_dvc or (opts.get("cache") is False and not opts.get("persist")):
                paths.append(path)
    return paths


def code_hashes(stage_defs: dict[str, Any]) -> dict[str, str]:
    """md5 (as dvc.lock records it) of every code dep of every stage, as the files are now."""
    paths = {d for st in stage_defs.values() for d in st.get("deps") or [] if isinstance(d, str) and d.startswith(CODE_DIRS)}
    return {p: hashlib.md5((REPO / p).read_bytes()).hexdigest() for p in sorted(paths) if (REPO / p).is_file()}


def head_params() -> tuple[str, str, dict[str, Any]]:
    sha = _run(["git", "rev-parse", "HEAD"], capture=True).strip()
    text = _run(["git", "show", f"HEAD:{PARAMS}"], capture=True)
    return sha, text, yaml.safe_load(text) or {}


def zero_shot_reason(params: dict[str, Any]) -> str | None:
    """Why GeoCLIP zero-shot cannot run on the committed backbone (None: it can): vidtag's one rule."""
    from vidtag.models.geoclip_head import zero_shot_unavailable

    backbone = params.get("backbone") or {}
    preset, arch = backbone.get("preset", "real"), (backbone.get("clip") or {}).get("arch", "ViT-L-14")
    if zero_shot_unavailable(None, {"preset": preset, "clip_arch": arch}) is None:
        return None
    return f"needs real CLIP ViT-L/14 features; backbone.preset is {preset!r}, CLIP {arch!r}"


def reset_to(found: Found, params_text: str, stage_defs: dict[str, Any]) -> None:
    """The workspace as ``found`` left it, touching only the pipeline's files: params.yaml (the commit's: it has the
    same values), ``found``'s dvc.lock, the outputs git keeps (``cache: false``: metrics, plots, DVCLive) exactly as
    in ``found``, and `dvc checkout` for the cached ones. Each experiment then re-runs only what its params touch."""
    from vidtag.io import write_text_atomic

    write_text_atomic(REPO / PARAMS, params_text)
    (REPO / "dvc.lock").write_bytes(_run(["git", "cat-file", "blob", f"{found.rev}:dvc.lock"], capture=True, binary=True))
    for path in (p for st in stage_defs.values() for p in _out_paths(st, untracked_by_dvc=True)):
        files = _run(["git", "ls-tree", "-r", "--name-only", found.rev, "--", path], capture=True).splitlines()
        if not files:  # not kept by git in this repository: left as it is
            continue
        target = REPO / path
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        for f in files:
            (REPO / f).parent.mkdir(parents=True, exist_ok=True)
            (REPO / f).write_bytes(_run(["git", "cat-file", "blob", f"{found.rev}:{f}"], capture=True, binary=True))
    try:
        _dvc("checkout", "--force", "--quiet", capture=True)
    except ExperimentsError as e:  # an output missing from the cache: the next `dvc exp run` makes it again
        print(f"experiments: {e} (continuing: the next run re-makes what is missing)", file=sys.stderr)


def check_workspace(sha: str) -> dict[str, Any] | None:
    """The saved state of an interrupted run on this commit, or None; refuses a workspace whose code or params
    differ from the commit (experiments would record changes their baseline does not have)."""
    state = None
    path = REPO / STATE_FILE
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except ValueError:
            state = None
        if not isinstance(state, dict) or state.get("head") != sha:
            state = None
    lines = _run(["git", "status", "--porcelain", "--untracked-files=all", "--", "vidtag", "pipeline", "dvc.yaml", PARAMS],
                 capture=True).splitlines()
    changed = [ln[3:] for ln in lines if ln.strip() and not (ln[3:] == PARAMS and state is not None)
               and not (ln.startswith("??") and not ln.endswith(".py"))]
    if changed:
        raise ExperimentsError(f"uncommitted changes in {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}: the "
                               "experiments are recorded against the last commit; commit (or stash) them first")
    return state


def run_pending(planned: Sequence[Planned], sha: str, params_text: str, state: dict[str, Any] | None,
                keep_going: bool) -> list[str]:
    """Run every pending or stale experiment in order, each from the baseline's run; returns the names that failed."""
    stage_defs = stages()
    failed: list[str] = []
    todo = [p for p in planned if p.status in ("pending", "stale") and p.runs_as == p.experiment.name]
    base = next((p.found for p in planned if p.experiment.name == BASELINE and p.status == "done"), None)
    path = REPO / STATE_FILE
    for i, p in enumerate(todo, 1):
        exp = p.experiment
        in_place = state is not None and state.get("running") == exp.name  # interrupted: its checkpoints resume
        if exp.name != BASELINE and not in_place:
            if base is None:
                raise ExperimentsError(f"the baseline experiment {BASELINE} has no finished run to start from")
            reset_to(base, params_text, stage_defs)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"head": sha, "running": exp.name}) + "\n")
        state = None
        args = ["exp", "run", "-n", exp.name, *(["-f"] if p.status == "stale" else [])]
        for o in exp.overrides:
            args += ["-S", f"++{o}"]
        print(f"experiments: [{i}/{len(todo)}] {exp.name}: dvc {' '.join(args)}" + (" (resuming in place)" if in_place else ""),
              flush=True)
        try:
            _dvc(*args)
        except ExperimentsError as e:
            failed.append(exp.name)
            print(f"experiments: {exp.name} failed: {e}", file=sys.stderr, flush=True)
            if exp.name == BASELINE or not keep_going:
                raise
            continue
        if exp.name == BASELINE:
            base = next((f for f in list_experiments() if f.name == BASELINE and f.baseline == sha), None)
    if todo and base is not None:
        reset_to(base, params_text, stage_defs)  # leave the workspace at the baseline's run
    path.unlink(missing_ok=True)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only these experiments (repeatable; the baseline always runs first)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    ap.add_argument("--collect-only", action="store_true", help="write the table from the experiments already run")
    ap.add_argument("--stop-on-failure", action="store_true", help="stop at the first failed experiment")
    ap.add_argument("--csv", default="metrics/experiments.csv", help="table to write (CSV, every metric)")
    ap.add_argument("--md", default="metrics/experiments.md", help="table to write (Markdown, the paper's columns)")
    args = ap.parse_args(argv)
    try:
        names = {e.name for e in EXPERIMENTS}
        unknown = sorted(set(args.only) - names)
        if unknown:
            raise ExperimentsError(f"unknown experiment(s) {unknown}; expected some of {sorted(names)}")
        chosen = [e for e in EXPERIMENTS if not args.only or e.name in args.only or e.name == BASELINE]
        sha, params_text, params = head_params()
        unavailable = zero_shot_reason(params)

        def current_plan(experiments):
            return plan(experiments, params, list_experiments(), code_hashes(stages()), sha, unavailable)

        planned = current_plan(chosen)
        for p in planned:
            cmd = " ".join(["dvc exp run -n", p.experiment.name, *(f"-S ++{o}" for o in p.experiment.overrides)])
            print(f"experiments: {p.experiment.name}: {p.status}" + (f" ({p.note})" if p.note else "")
                  + (f": {cmd}" if p.status in ("pending", "stale") and p.runs_as == p.experiment.name else ""))
        if args.dry_run:
            return 0
        failed: list[str] = []
        if not args.collect_only and any(p.status in ("pending", "stale") for p in planned):
            failed = run_pending(planned, sha, params_text, check_workspace(sha), keep_going=not args.stop_on_failure)
        table = build_table(ROWS, current_plan(EXPERIMENTS))
        write_tables(table, REPO / args.csv, REPO / args.md)
        print(f"experiments: wrote {args.csv} and {args.md} ({sum(r['status'] == 'done' for r in table)} of {len(table)} "
              "rows with results)")
        if failed:
            print(f"experiments: failed: {', '.join(failed)}", file=sys.stderr)
            return 1
        return 0
    except ExperimentsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
