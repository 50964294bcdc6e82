"""The DVC pipeline as a user runs it: stage declarations, params files, and a whole small run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from small_repo import run, small_repo

REPO = Path(__file__).resolve().parents[1]
PARAMS_FILES = [REPO / "params.yaml", *sorted((REPO / "params").glob("*.yaml"))]


def _dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_each_stage_declares_exactly_the_params_its_script_reads():
    for name, stage in _dvc_yaml()["stages"].items():
        script = REPO / "pipeline" / f"{name}.py"
        read = set(re.findall(r'load_params\(([^)]*)\)', script.read_text())[0].replace('"', "").replace(" ", "").split(","))
        declared = set(stage["params"]) - {"seed"}
        assert declared == read, f"stage {name}: dvc.yaml declares {declared}, {script.name} reads {read}"
        assert f"pipeline.{name} " in stage["cmd"] and f"pipeline/{name}.py" in stage["deps"]


def test_feature_store_is_not_copied_into_the_dvc_cache_and_survives_reruns():
    outs = _dvc_yaml()["stages"]["extract"]["outs"]
    store = next(o["cache/features.zarr"] for o in outs if isinstance(o, dict) and "cache/features.zarr" in o)
    assert store == {"cache": False, "persist": True}


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.name)
def test_params_files_build_every_stage_config(path):
    """A typo in any shipped params file must fail here, not an hour into a GPU run."""
    from pipeline.common import pick
    from vidtag.evaluation import EvalConfig, EvalRuntime
    from vidtag.features.extract import configs_from_params
    from vidtag.models.config import GeoRefinerConfig, VidTAGConfig, build_config
    from vidtag.train.loop import RuntimeConfig
    from vidtag.train.phase1 import Phase1Config
    from vidtag.train.phase2 import Phase2Config

    params = yaml.safe_load(path.read_text())
    assert set(params) >= {"seed", "data", "backbone", "gallery", "phase1", "phase2", "eval", "runtime"}
    configs_from_params(params["backbone"])
    runtime = params["runtime"]
    build_config(RuntimeConfig, pick(runtime, RuntimeConfig))
    EvalRuntime(**pick(runtime, EvalRuntime))
    known = set(RuntimeConfig.__dataclass_fields__) | set(EvalRuntime.__dataclass_fields__) | {"extract_workers", "threads"}
    assert set(runtime) <= known, set(runtime) - known
    p1 = dict(params["phase1"])
    VidTAGConfig.from_dict(p1.pop("model", {}) or {})
    assert isinstance(p1.pop("frame_expert", False), bool)  # read by the train_phase1 stage itself
    build_config(Phase1Config, p1)
    p2 = dict(params["phase2"])
    GeoRefinerConfig(**(p2.pop("refiner", {}) or {}))
    build_config(Phase2Config, p2)
    EvalConfig(**params["eval"])
    readers = {"toy", "msls", "bdd", "cityguessr", "frames", "video"}
    galleries = {"grid", "city_centres", "geoclip100k"}
    if "sources" in params["data"]:  # several datasets in one manifest (App. H): each entry is one reader's
        from vidtag.data.unified import parse_sources

        specs = parse_sources(params["data"]["sources"])
        assert {spec.source for spec in specs} <= readers
        parts = params["gallery"]["datasets"]  # each dataset scored against its own gallery
        assert set(parts) == {spec.name for spec in specs}
        assert {part.get("kind", "grid") for part in parts.values()} <= galleries
    else:
        assert params["data"]["source"] in readers
        assert params["gallery"]["kind"] in galleries


@pytest.mark.slow
def test_dvc_repro_on_a_small_toy_world(tmp_path):
    """Clone the tracked tree, shrink the demo, run `dvc repro`, then check what a user relies on."""
    work = tmp_path / "repo"
    env = small_repo(work, epochs=3, eval_every=1, n_maps=2)
    params = yaml.safe_load((work / "params.yaml").read_text())  # the shrunk demo, changed below
    run(["dvc", "repro"], work, env)

    metrics = json.loads((work / "metrics" / "eval.json").read_text())
    for group in ("frame", "video"):
        assert set(metrics[group]) == {"acc_0.1km", "acc_0.25km", "acc_0.5km", "acc_1km", "acc_5km", "acc_25km", "median_km"}
        assert all(0 <= metrics[group][k] <= 100 for k in metrics[group] if k.startswith("acc_"))
    assert set(metrics["trajectory"]) == {"dfd_deg", "mrd_deg", "dfd_km", "mrd_km"}
    assert metrics["n_sequences"] == 2  # 20 % of 5 drives per city go to val
    assert "frame" in metrics["phase1"] and "path_length_ratio" in metrics["shape"] and "shape" in metrics["phase1"]

    from vidtag.models.bundle import load_bundle

    bundle = load_bundle(work / "cache" / "bundle", "cpu")
    assert bundle.gallery_path.exists() and bundle.config["backbones"]["config"]["preset"] == "tiny"
    assert load_bundle(work / "cache" / "model", "cpu").gallery_path is None  # training never reads the gallery
    assert (work / "plots" / "error_cdf.csv").exists() and len(list((work / "plots" / "maps").glob("*.png"))) == 2

    # Unchanged: a no-op. A phase2 param: only train_phase2 and evaluate run.
    assert "Data and pipelines are up to date" in run(["dvc", "repro"], work, env)
    params["phase2"]["alpha"] = 1.0
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = run(["dvc", "repro"], work, env)
    assert set(re.findall(r"Running stage '(\w+)'", log)) == {"train_phase2", "evaluate"}, log
    # a gallery param: only the gallery and the evaluation run (Table 5's sweep never retrains)
    params["gallery"]["resolution_km"] = 0.2
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = run(["dvc", "repro"], work, env)
    assert set(re.findall(r"Running stage '(\w+)'", log)) == {"gallery", "evaluate"}, log
    # runtime settings change how stages run, not what they compute: nothing re-runs
    params["runtime"].update(eval_every=2, device="cpu", features_in_memory=False)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "Data and pipelines are up to date" in run(["dvc", "repro"], work, env)


def test_dvclive_curves_continue_across_a_resume(tmp_path):
    """Killed after logging epoch 3 but before its checkpoint: the resumed run logs epochs 3-4 again at
    steps 2-3, after the first two epochs' steps, even though DVC deleted the DVCLive folder in between."""
    import torch

    from pipeline.training import run_resumable
    from vidtag.train.checkpoint import read_state, save_checkpoint

    ckpt, live_dir = tmp_path / "ckpt", tmp_path / "dvclive"

    def train(kill_after=None):
        def run(live):
            state = read_state(ckpt)
            for epoch in range(state["epoch"] if state else 0, 4):
                live.log_metric("phase/loss", 10.0 - epoch)
                live.next_step()
                if epoch == kill_after:
                    raise KeyboardInterrupt  # killed between logging the epoch and checkpointing it
                save_checkpoint(ckpt, {"m": torch.nn.Linear(1, 1)}, None,
                                {"config": {}, "step": epoch + 1, "epoch": epoch + 1, "complete": epoch == 3})
            return {}
        return run

    with pytest.raises(KeyboardInterrupt):
        run_resumable(train(kill_after=2), ckpt, str(live_dir))
    shutil.rmtree(live_dir)  # DVC removes the stage's DVCLive output before running it again
    run_resumable(train(), ckpt, str(live_dir))
    rows = [line.split("\t") for line in (live_dir / "plots/metrics/phase/loss.tsv").read_text().splitlines()]
    assert rows[0] == ["step", "loss"]
    assert [(int(r[0]), float(r[1])) for r in rows[1:]] == [(0, 10.0), (1, 9.0), (2, 8.0), (3, 7.0)]


def test_run_resumable_resumes_only_an_unfinished_checkpoint_of_the_same_params(tmp_path):
    from pipeline.training import run_resumable
    from vidtag.errors import CheckpointMismatchError

    ckpt = tmp_path / "ckpt"

    def write_state(complete: bool, delivered: bool = False):
        ckpt.mkdir()
        (ckpt / "state.json").write_text(json.dumps({"complete": complete, "delivered": delivered}))

    write_state(complete=True, delivered=True)  # DVC re-runs the stage: a finished, delivered run is stale
    assert run_resumable(lambda live: {"resumed": ckpt.exists()}, ckpt, None) == {"resumed": False}

    write_state(complete=False)  # interrupted, same params: resumed
    assert run_resumable(lambda live: {"resumed": ckpt.exists()}, ckpt, None) == {"resumed": True}
    shutil.rmtree(ckpt)

    write_state(complete=True)  # finished, but its outputs were never written (a failed bundle write): kept
    assert run_resumable(lambda live: {"resumed": ckpt.exists()}, ckpt, None) == {"resumed": True}
    assert json.loads((ckpt / "state.json").read_text())["delivered"] is True  # written now: stale next time
    shutil.rmtree(ckpt)

    write_state(complete=False)  # written with other params: discarded, and training starts afresh

    calls = []

    def train_other_params(live):
        calls.append(ckpt.exists())
        if ckpt.exists():
            raise CheckpointMismatchError("written with other params")
        return {"ok": True}

    assert run_resumable(train_other_params, ckpt, None) == {"ok": True} and calls == [True, False]
