"""`make experiments` (pipeline/experiments.py): which of the paper's rows are done, pending or skipped, from what
`dvc exp show --json` lists, and the table written from them. Fast: fake `dvc exp show` output, no DVC run; the
slow test runs two experiments end to end in a small clone of the repository."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
import yaml
from small_repo import run, small_repo

from pipeline import experiments as ex
from pipeline.experiments import BASELINE, EXPERIMENTS, ROWS

HEAD, OLD = "a" * 40, "b" * 40
CODE = {"pipeline/evaluate.py": "11", "vidtag/geo.py": "22"}
BASE = {"seed": 0, "backbone": {"preset": "tiny", "clip": {"arch": "ViT-L-14"}}, "gallery": {"resolution_km": 0.1},
        "phase1": {"seq_len": 16, "kind": "vidtag", "model": {"frame": {"backbones": ["clip", "dino"]}}},
        "phase2": {"seq_len": 16, "alpha": 10.0, "beta": 1.0}}


def eval_json(acc_1km: float, p1_acc_1km: float) -> dict:
    """metrics/eval.json's shape (vidtag.evaluation): the answer's groups, and the same under ``phase1``."""
    def groups(acc):
        return {"frame": {"acc_0.1km": 0.0, "acc_0.5km": acc / 2, "acc_1km": acc, "acc_5km": 80.0, "acc_25km": 100.0,
                          "median_km": 3.0},
                "video": {"acc_1km": acc - 1, "acc_5km": 70.0, "median_km": 3.5},
                "trajectory": {"dfd_km": 4.0, "mrd_km": 2.0, "dfd_deg": 0.04, "mrd_deg": 0.02},
                "shape": {"path_length_ratio": 0.5, "distinct_points": 3.0}}
    decoded = {"frame_acc_1km": acc_1km + 0.5, "dfd_km": 3.0, "frames_off_25km_pct": 1.5}  # compare.viterbi.*: flat
    return {**groups(acc_1km), "phase1": groups(p1_acc_1km), "n_sequences": 12, "n_frames": 3642, "cost": {"gallery_points": 9},
            "compare": {"viterbi": {"final": decoded, "phase1": {**decoded, "frame_acc_1km": p1_acc_1km + 0.5}},
                        "argmax": {"final": {"frame_acc_1km": acc_1km, "frames_off_25km_pct": 2.5}}}}


def rev(name: str, sha: str, params: dict, metrics: dict | None, code: dict = CODE, error=None) -> dict:
    """One experiment group as `dvc exp show --json` (DVC 3) writes it."""
    data = {"rev": sha, "timestamp": "2026-11-23T21:35:49", "params": {"params.yaml": {"data": params}},
            "metrics": {} if metrics is None else {"metrics/eval.json": {"data": metrics}},
            "deps": {p: {"hash": h, "size": 1, "nfiles": None} for p, h in {**code, "cache/manifest.parquet": "x"}.items()},
            "outs": {}, "meta": {}}
    return {"revs": [{"rev": sha, "name": name, "data": data, "error": error, "experiments": None}], "executor": None, "name": name}


def exp_show() -> list[dict]:
    p = ex.apply_overrides
    head_exps = [
        rev(BASELINE, "c" * 40, BASE, eval_json(7.0, 14.0)),
        rev("paper-t5-gallery-1km", "d" * 40, p(BASE, ["gallery.resolution_km=1.0"]), eval_json(5.0, 12.0)),
        rev("paper-t7-alpha-1", "e" * 40, p(BASE, ["phase2.alpha=3.0"]), eval_json(6.0, 14.0)),  # other params
        rev("paper-t4-dino", "f" * 40, p(BASE, ["phase1.model.frame.backbones=[dino]", "phase1.model.frame.tempgeo_layers=0"]),
            None, error={"type": "CollectionError", "msg": "metrics missing"}),
    ]
    old_exps = [
        rev("paper-t10-seq-4", "1" * 40, p(BASE, ["phase1.seq_len=4", "phase2.seq_len=4"]), eval_json(4.0, 9.0)),
        rev("paper-t10-seq-8", "2" * 40, p(BASE, ["phase1.seq_len=8", "phase2.seq_len=8"]), eval_json(4.5, 9.5),
            code={**CODE, "vidtag/geo.py": "older"}),  # run with other code: does not count
    ]
    return [{"rev": "workspace", "name": None, "data": {}, "error": None, "experiments": None},
            {"rev": HEAD, "name": "main", "data": {}, "error": None, "experiments": head_exps},
            {"rev": OLD, "name": None, "data": {}, "error": None, "experiments": old_exps}]


@pytest.fixture
def planned():
    found = ex.parse_exp_show(exp_show())
    return {p.experiment.name: p for p in ex.plan(EXPERIMENTS, BASE, found, CODE, HEAD, ex.zero_shot_reason(BASE))}


def test_overrides_set_nested_keys_as_dvc_does():
    out = ex.apply_overrides({"a": {"x": 1}, "m": None}, ["a.y=[dino]", "m.frame.n=0", "a.x=2.5"])
    assert out == {"a": {"x": 2.5, "y": ["dino"]}, "m": {"frame": {"n": 0}}}
    with pytest.raises(ex.ExperimentsError, match="not key=value"):
        ex.parse_override("phase1.kind")


def test_every_experiment_of_a_row_exists_and_names_are_unique():
    names = [e.name for e in EXPERIMENTS]
    assert len(set(names)) == len(names) and names[0] == BASELINE  # the baseline runs first: the others start from it
    assert {r.experiment for r in ROWS if r.experiment} <= set(names)
    assert {r.stage for r in ROWS} == set(ex.STAGES)
    for e in EXPERIMENTS:  # every override parses, and names are valid git ref components for `dvc exp run -n`
        [ex.parse_override(o) for o in e.overrides]
        assert subprocess.run(["git", "check-ref-format", f"refs/exps/{e.name}"]).returncode == 0


def test_plan_reads_what_dvc_lists(planned):
    status = {n: p.status for n, p in planned.items()}
    assert status[BASELINE] == "done" and status["paper-t5-gallery-1km"] == "done"
    # the committed values: the baseline's run, not a second experiment
    for alias in ("paper-t5-gallery-0.1km", "paper-t10-seq-16"):
        assert planned[alias].runs_as == BASELINE and status[alias] == "done"
    # the demo refines with GPS offsets: Table 7's rows run the paper-literal refiner, alpha 10 included
    assert planned["paper-t7-alpha-10"].runs_as == "paper-t7-alpha-10"
    assert status["paper-t7-alpha-1"] == "stale"  # this commit has one of that name, with other params: run with -f
    assert status["paper-t4-dino"] == "stale"  # and one that failed
    assert status["paper-t10-seq-4"] == "done" and OLD[:7] in planned["paper-t10-seq-4"].note  # same code and params
    assert status["paper-t10-seq-8"] == "pending"  # an earlier commit's run with other code does not count
    assert status["paper-t4-dino-tempgeo"] == "pending" and status["paper-geoclip-finetune"] == "pending"
    assert status["paper-geoclip-zero-shot"] == "skipped"  # tiny backbones: GeoCLIP's head cannot read them
    assert "needs real CLIP ViT-L/14 features" in planned["paper-geoclip-zero-shot"].note
    real = {**BASE, "backbone": {"preset": "real", "clip": {"arch": "ViT-L-14"}}}
    assert ex.zero_shot_reason(real) is None


def test_table_rows_report_the_answer_each_row_is(planned):
    table = {(r["table"], r["row"]): r for r in ex.build_table(ROWS, list(planned.values()))}
    full = table[("Table 4", "CLIP + DINOv2 + TempGeo + GeoRefiner (VidTAG)")]
    no_refiner = table[("Table 4", "CLIP + DINOv2 + TempGeo")]
    assert full["experiment"] == no_refiner["experiment"] == BASELINE and full["rev"] == "c" * 7
    assert full["frame_acc_1km"] == 7.0 and no_refiner["frame_acc_1km"] == 14.0  # final vs Fig. 5's first stage
    assert full["video_acc_1km"] == 6.0 and full["dfd_km"] == 4.0 and full["shape_path_length_ratio"] == 0.5
    assert full["n_sequences"] == 12 and full["n_gallery_points"] == 9.0 and "cost_gallery_points" not in full
    decoded, p1_decoded = table[("Beyond (App. L)", "final + Viterbi")], table[("Beyond (App. L)", "Phase I + Viterbi")]
    assert decoded["frame_acc_1km"] == 7.5 and decoded["frames_off_25km_pct"] == 1.5 and p1_decoded["frame_acc_1km"] == 14.5
    assert "shape_path_length_ratio" not in decoded  # compare.viterbi holds no shape: nothing borrowed from argmax
    assert full["frames_off_25km_pct"] == 2.5 and "frames_off_25km_pct" not in no_refiner  # from compare.argmax.final
    assert table[("Table 5", "gallery 1 km")]["frame_acc_1km"] == 5.0
    assert table[("Table 10", "4 frames")]["frame_acc_1km"] == 4.0
    assert table[("Table 10", "8 frames")]["status"] == "not run" and "frame_acc_1km" not in table[("Table 10", "8 frames")]
    assert table[("Tables 1-2", "GeoCLIP zero-shot (App. F.1)")]["status"] == "skipped"
    siglip = table[("Table 6", "CLIP + SigLIP")]
    assert siglip["status"] == "not run" and "tiny random towers" in siglip["note"]  # the row's own caveat is kept
    missing = ex.build_table([ex.Row("Table 9", "a row this pipeline lacks", None, note="why")], list(planned.values()))
    assert missing[0]["status"] == "not available" and missing[0]["note"] == "why"

    rows = list(csv.DictReader(io.StringIO(ex.to_csv(list(table.values())))))
    header = list(rows[0])
    assert header[:len(ex.LEAD_COLUMNS)] == ex.LEAD_COLUMNS
    metric_cols = header[len(ex.LEAD_COLUMNS):]
    assert metric_cols[:6] == ["frame_acc_0.1km", "frame_acc_0.5km", "frame_acc_1km", "frame_acc_5km", "frame_acc_25km",
                               "frame_median_km"]  # thresholds in numeric order, then the median
    back = next(r for r in rows if r["row"] == "gallery 1 km")
    assert float(back["frame_acc_1km"]) == 5.0 and back["overrides"] == "gallery.resolution_km=1.0"
    assert next(r for r in rows if r["row"] == "8 frames")["frame_acc_1km"] == ""

    md = ex.to_markdown(list(table.values()))
    sections = [line for line in md.splitlines() if line.startswith("## ")]
    assert sections == ["## Table 4", "## Tables 1-2", "## Table 5", "## Table 6", "## Table 7", "## Table 10",
                        "## Beyond (App. L)"]
    line = next(line for line in md.splitlines() if line.startswith("| CLIP + DINOv2 + TempGeo + GeoRefiner"))
    assert "| 3.5 | 7.0 | 80.0 | 100.0 | 3.00 |" in line  # frame acc@0.5/1/5/25 km, then the median
    assert "needs real CLIP ViT-L/14 features" in md and "frame acc@0.1 km" not in md


def test_collect_only_writes_both_tables(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "head_params", lambda: (HEAD, yaml.safe_dump(BASE), BASE))
    monkeypatch.setattr(ex, "list_experiments", lambda: ex.parse_exp_show(exp_show()))
    monkeypatch.setattr(ex, "code_hashes", lambda stage_defs: CODE)
    monkeypatch.setattr(ex, "_run", lambda *a, **k: pytest.fail("collecting must run nothing"))
    (tmp_path / "old.csv").write_text("stale\n")
    assert ex.main(["--collect-only", "--csv", str(tmp_path / "old.csv"), "--md", str(tmp_path / "t.md")]) == 0
    rows = list(csv.DictReader((tmp_path / "old.csv").open()))
    assert len(rows) == len(ROWS) and (tmp_path / "t.md").read_text().startswith("# The paper's comparison rows")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.csv", "t.md"]  # atomic: no temporary files left
    assert ex.main(["--only", "paper-wizard"]) == 1


@pytest.mark.slow
def test_make_experiments_in_a_small_clone(tmp_path):
    """Two experiments end to end in a small clone (as tests/test_pipeline.py sets one up): GeoCLIP fine-tuned
    (Phase I only, passed on by train_phase2, evaluated as Phase I, packed and predicted with) and a gallery row;
    a second invocation runs nothing; the workspace is left at the baseline's run."""
    work = tmp_path / "repo"
    env = small_repo(work, epochs=2, eval_every=0, n_maps=1)

    cmd = [sys.executable, "-m", "pipeline.experiments", "--only", "paper-geoclip-finetune", "--only", "paper-t5-gallery-1km"]
    first = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rows = {r["row"]: r for r in csv.DictReader((work / "metrics" / "experiments.csv").open())}
    ft = rows["GeoCLIP fine-tuned (CLIP, frames as images; App. F.4)"]
    assert ft["status"] == "done" and ft["experiment"] == "paper-geoclip-finetune"
    assert rows["gallery 1 km"]["status"] == "done" and rows["gallery 0.1 km"]["experiment"] == BASELINE
    assert rows["CLIP + DINOv2 + TempGeo"]["status"] == "done" and rows["DINOv2"]["status"] == "not run"
    assert rows["GeoCLIP zero-shot (App. F.1)"]["status"] == "skipped"
    assert "| GeoCLIP fine-tuned" in (work / "metrics" / "experiments.md").read_text()

    shown = ex.parse_exp_show(json.loads(subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=work,
                                                        env=env, capture_output=True, text=True, check=True).stdout))
    by_name = {f.name: f for f in shown}
    assert set(by_name) == {BASELINE, "paper-geoclip-finetune", "paper-t5-gallery-1km"}
    ft_metrics = by_name["paper-geoclip-finetune"].metrics
    assert ft_metrics["frame"] == ft_metrics["phase1"]["frame"]  # no GeoRefiner: the answer is Phase I's
    assert by_name["paper-t5-gallery-1km"].metrics["cost"]["gallery_points"] < by_name[BASELINE].metrics["cost"]["gallery_points"]
    # the workspace is the baseline's run again, with the committed params
    assert run(["git", "status", "--porcelain", "params.yaml"], work, env) == ""
    assert json.loads((work / "metrics" / "eval.json").read_text()) == by_name[BASELINE].metrics

    again = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)  # resumable: everything is done
    assert again.returncode == 0 and "[1/" not in again.stdout and ": pending" not in again.stdout, again.stdout

    # the fine-tuned GeoCLIP, as evaluate packed it, predicts through `vidtag predict --model cache/bundle`
    subprocess.run([sys.executable, "-m", "dvc", "exp", "apply", "paper-geoclip-finetune"], cwd=work, env=env, check=True,
                   capture_output=True)
    from vidtag.models.bundle import load_bundle

    bundle = load_bundle(work / "cache" / "bundle")
    assert bundle.kind == "geoclip" and bundle.refiner is None and bundle.gallery_path is not None
    frame = next((work / "cache" / "toy").rglob("*.jpg"))
    out = tmp_path / "pred.csv"
    pred = subprocess.run([sys.executable, "-m", "vidtag.cli", "predict", str(frame), "--model", str(work / "cache" / "bundle"),
                           "--out", str(out), "--no-progress", "--cache-dir", str(tmp_path / "c")], cwd=work, env=env,
                          capture_output=True, text=True)
    assert pred.returncode == 0, pred.stdout + pred.stderr
    assert out.read_text().count("\n") == 2  # header and the one frame
