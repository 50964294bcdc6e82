"""The training loop as a GPU would need it, checked on the CPU: bf16 autocast trains close to fp32, steps ask
the device nothing (no host syncs), finiteness is checked every N steps, checkpoints are written from a
snapshot in the background, by epochs or by minutes, Adam's implementation is the machine's, compile runs."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
import torch
from test_batches import write_store
from test_train import P1, P2, RT1, RT2, TINY_MODEL, World, make_world
from torch.utils._python_dispatch import TorchDispatchMode

from vidtag.errors import CheckpointError, TrainingError
from vidtag.features.sequences import build_sequences
from vidtag.models.config import GeoRefinerConfig
from vidtag.train import loop
from vidtag.train.batches import sample_frames
from vidtag.train.checkpoint import load_checkpoint, save_checkpoint
from vidtag.train.phase1 import train_phase1
from vidtag.train.phase2 import train_phase2


@pytest.fixture(scope="module")
def world():
    return make_world(n_seq=24)


def _weights(directory):
    return load_checkpoint(directory).weights


# -- bf16 -------------------------------------------------------------------------------------------


def test_bf16_trains_close_to_fp32(world, tmp_path):
    """Phase I with bf16 autocast: the same run in another precision, so losses track fp32's closely and the
    model learns as much; not bit-identical (else the option would do nothing)."""
    p1 = replace(P1, epochs=6)
    runs = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        losses = []

        class Live:
            def log_metric(self, key, value):
                if key == "phase1/train_loss":
                    losses.append(value)

            def next_step(self):
                pass

        metrics = train_phase1(world, world.manifest, world.gallery, tmp_path / name, replace(p1, bf16=bf16), TINY_MODEL,
                               Live(), runtime=replace(RT1, eval_every=0))
        runs[name] = (np.array(losses), metrics)
    (l32, m32), (l16, m16) = runs["fp32"], runs["bf16"]
    assert len(l32) == len(l16) == 6 and l16[-1] < l16[0] - 0.3  # bf16 learns
    assert not np.array_equal(l32, l16)  # and really ran in bf16
    np.testing.assert_allclose(l16, l32, rtol=0.1)  # the first steps differ most (an untrained model's logits)
    assert abs(l16[-1] - l32[-1]) < 0.02 * l32[-1]
    assert abs(m16["val_median_km"] - m32["val_median_km"]) < 0.5 * m32["val_median_km"]
    w32, w16 = _weights(tmp_path / "fp32" / "checkpoint"), _weights(tmp_path / "bf16" / "checkpoint")
    assert all(w16[k].dtype == w32[k].dtype for k in w32)  # autocast leaves the weights in fp32


def test_bf16_streamed_equals_bf16_resident(world, tmp_path):
    """The streamed input path under bf16 gives the same weights as resident features, Phase I and II."""
    lazy = write_store(world, tmp_path / "f.zarr")
    p1, rt = replace(P1, epochs=1, bf16=True), replace(RT1, eval_every=0)
    for mode in (True, False):
        train_phase1(lazy, world.manifest, world.gallery, tmp_path / f"p1_{mode}", p1, TINY_MODEL,
                     runtime=replace(rt, features_in_memory=mode))
    a, b = _weights(tmp_path / "p1_True" / "checkpoint"), _weights(tmp_path / "p1_False" / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)
    gallery_path = tmp_path / "gallery.parquet"
    pl.DataFrame({"lat": world.gallery[:, 0], "lon": world.gallery[:, 1]}).write_parquet(gallery_path)
    refiner = GeoRefinerConfig(**TINY_MODEL.refiner.__dict__)
    for mode in (True, False):
        train_phase2(lazy, world.manifest, gallery_path, world.gallery, tmp_path / "p1_True", tmp_path / f"m_{mode}",
                     tmp_path / f"p2_{mode}", replace(P2, epochs=1, bf16=True), refiner,
                     runtime=replace(RT2, eval_every=0, features_in_memory=mode))
    a, b = _weights(tmp_path / "p2_True"), _weights(tmp_path / "p2_False")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_autocast_helper_runs_matmuls_in_bf16_and_is_a_no_op_when_off():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with loop.autocast(torch.device("cpu"), True):
        assert lin(x).dtype == torch.bfloat16
    with loop.autocast(torch.device("cpu"), False):
        assert lin(x).dtype == torch.float32


# -- no host syncs ------------------------------------------------------------------------------------

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "item"}  # what blocks the host on CUDA


class SyncRecorder(TorchDispatchMode):
    """Records every op that would make the host wait for a GPU: .item()/bool()/float() (_local_scalar_dense),
    nonzero, and indexing by a boolean mask (it sizes its result with nonzero)."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else []) if t is not None)
        if name in SYNC_OPS or bool_index:
            self.syncs.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _record_steps(monkeypatch) -> list[list[str]]:
    """Per training step, the syncing ops of the phase's step (forward, loss) and the backward pass."""
    per_step: list[list[str]] = []
    real_run, real_opt = loop.run, loop.optimizer_step

    def run(phase, *args, **kwargs):
        step = phase.step

        def recorded(batch, gen):
            rec = SyncRecorder()
            with rec:
                out = step(batch, gen)
            per_step.append(rec.syncs)
            return out

        phase.step = recorded
        return real_run(phase, *args, **kwargs)

    def optimizer_step(optimizer, loss, lr):
        rec = SyncRecorder()
        with rec:
            loss.backward(retain_graph=True)  # the backward pass alone; the real step below redoes it
        per_step[-1] += rec.syncs
        optimizer.zero_grad(set_to_none=True)
        real_opt(optimizer, loss, lr)

    monkeypatch.setattr(loop, "run", run)
    monkeypatch.setattr(loop, "optimizer_step", optimizer_step)
    return per_step


def test_phase1_steps_never_wait_for_the_device(world, tmp_path, monkeypatch):
    """With short sequences (pads in every batch: boolean masks would be needed) Phase I's step and backward
    contain no op that syncs, and neither do Phase II's (its loss weighs pads 0 instead of selecting frames by a mask)."""
    short = replace(P1, epochs=1, seq_len=16)
    model = TINY_MODEL.from_dict({**TINY_MODEL.to_dict(), "frame": {**TINY_MODEL.to_dict()["frame"], "max_positions": 16},
                                  "refiner": {**TINY_MODEL.to_dict()["refiner"], "max_positions": 16}})
    per_step = _record_steps(monkeypatch)
    train_phase1(world, world.manifest, world.gallery, tmp_path / "p1", short, model, runtime=replace(RT1, eval_every=0))
    assert len(per_step) >= 2 and all(s == [] for s in per_step), per_step

    gallery_path = tmp_path / "gallery.parquet"
    pl.DataFrame({"lat": world.gallery[:, 0], "lon": world.gallery[:, 1]}).write_parquet(gallery_path)
    per_step.clear()
    train_phase2(world, world.manifest, gallery_path, world.gallery, tmp_path / "p1", tmp_path / "m", tmp_path / "p2",
                 replace(P2, epochs=1, seq_len=16), GeoRefinerConfig(**model.refiner.__dict__),
                 runtime=replace(RT2, eval_every=0))
    assert per_step and all(s == [] for s in per_step), per_step


def test_valid_positions_equal_boolean_masking():
    world = make_world(n_seq=20)
    table = build_sequences(world.manifest, world.valid, "train")
    lengths_host = table.lengths.numpy()
    gen = torch.Generator().manual_seed(3)
    for mode in ("subset", "window"):
        for seq_len in (4, 16, 40):
            seq_idx = torch.randperm(len(table), generator=gen)[:7]
            rows, pad = sample_frames(table, seq_idx, seq_len, gen, mode)
            n = loop.frames_in_batch(lengths_host, seq_idx.numpy(), pad.shape[1])
            assert n == int((~pad).sum())
            x = torch.randn(*pad.shape, 5)
            assert torch.equal(x.flatten(0, 1)[loop.valid_positions(pad, n)], x[~pad])


# -- finiteness every N steps -------------------------------------------------------------------------


def test_finiteness_is_checked_every_n_steps_and_at_each_epoch_end(world, tmp_path, monkeypatch):
    calls = []
    real = loop.check_finite
    monkeypatch.setattr(loop, "check_finite", lambda losses, first, where, d: calls.append(len(losses)) or real(losses, first, where, d))
    p1 = replace(P1, epochs=2)  # 18 train sequences in batches of 8, 8 and 2: 3 steps an epoch
    train_phase1(world, world.manifest, world.gallery, tmp_path, p1, TINY_MODEL, runtime=replace(RT1, check_every=1))
    assert calls == [1, 1, 1, 0, 1, 1, 1, 0]  # every step, then the epoch's end with nothing left unchecked
    calls.clear()
    train_phase1(world, world.manifest, world.gallery, tmp_path / "b", p1, TINY_MODEL, runtime=replace(RT1, check_every=2))
    assert calls == [2, 1, 2, 1]
    calls.clear()
    train_phase1(world, world.manifest, world.gallery, tmp_path / "c", p1, TINY_MODEL, runtime=replace(RT1, check_every=100))
    assert calls == [3, 3]  # once an epoch: the epoch's end


def test_a_non_finite_loss_names_its_step_and_keeps_the_checkpoint(world, tmp_path):
    train_phase1(world, world.manifest, world.gallery, tmp_path, replace(P1, epochs=1), TINY_MODEL, runtime=RT1)
    before = (tmp_path / "checkpoint" / "weights.safetensors").read_bytes()
    broken = World(world.clip.copy(), world.dino, world.valid, world.manifest, world.gallery)
    broken.clip[:] = np.nan
    # 3 steps an epoch: epoch 2 begins at step 4, checked only at the epoch's end, and the first bad step is named
    with pytest.raises(TrainingError, match=r"phase1 epoch 2 step 4: loss is nan.*last good checkpoint is kept"):
        train_phase1(broken, world.manifest, world.gallery, tmp_path, replace(P1, epochs=2), TINY_MODEL,
                     runtime=replace(RT1, check_every=1000))
    assert (tmp_path / "checkpoint" / "weights.safetensors").read_bytes() == before


# -- checkpoints ----------------------------------------------------------------------------------------


def _written_epochs(monkeypatch) -> list[int]:
    epochs = []
    real = loop.CheckpointWriter.write
    monkeypatch.setattr(loop.CheckpointWriter, "write",
                        lambda self, d, m, o, state: epochs.append(state["epoch"]) or real(self, d, m, o, state))
    return epochs


@pytest.mark.parametrize(("every", "minutes", "expected"), [(1, 0.0, [1, 2, 3]), (2, 0.0, [2, 3]), (0, 0.0, [3]),
                                                               (0, 1e-9, [1, 2, 3]), (0, 1e6, [3])])
def test_checkpoints_by_epochs_or_minutes(world, tmp_path, monkeypatch, every, minutes, expected):
    epochs = _written_epochs(monkeypatch)
    train_phase1(world, world.manifest, world.gallery, tmp_path, replace(P1, epochs=3), TINY_MODEL,
                 runtime=replace(RT1, checkpoint_every=every, checkpoint_minutes=minutes))
    assert epochs == expected
    assert load_checkpoint(tmp_path / "checkpoint").state["epoch"] == 3


def test_checkpoint_is_a_snapshot_written_in_the_background(tmp_path, monkeypatch):
    """The loop goes on while the disk is written; what is written is the state at the time of the call."""
    gate, real = threading.Event(), loop.save_checkpoint

    def slow_save(*args):
        assert gate.wait(10)
        return real(*args)

    monkeypatch.setattr(loop, "save_checkpoint", slow_save)
    module = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(module.parameters(), lr=0.1)
    module(torch.ones(1, 3)).sum().backward()
    opt.step()
    want = {k: v.clone() for k, v in module.state_dict().items()}
    writer = loop.CheckpointWriter()
    writer.write(tmp_path / "ckpt", {"m": module}, opt, {"epoch": 1})
    assert not (tmp_path / "ckpt").exists()  # returned before the write
    with torch.no_grad():
        module.weight.add_(1.0)  # training goes on
    opt.step()
    gate.set()
    writer.wait()
    got = load_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(got.module_state("m")[k], want[k]) for k in want)


def test_a_failed_background_write_is_raised_by_the_run(world, tmp_path, monkeypatch):
    def full_disk(*args):
        raise CheckpointError("cannot write checkpoint (No space left on device); the previous checkpoint is kept")

    monkeypatch.setattr(loop, "save_checkpoint", full_disk)
    with pytest.raises(CheckpointError, match="No space left"):
        train_phase1(world, world.manifest, world.gallery, tmp_path, replace(P1, epochs=2), TINY_MODEL, runtime=RT1)


# -- Adam, resume, runtime checks -----------------------------------------------------------------------


def test_adam_is_fused_on_cuda_only_and_resume_keeps_this_machines_choice(tmp_path):
    params = [torch.nn.Parameter(torch.ones(3))]
    assert loop.adam(params, 0.1, torch.device("cpu")).param_groups[0]["fused"] is None  # CPU runs reproduce
    module = torch.nn.Linear(2, 2)
    saved_by = torch.optim.Adam(module.parameters(), lr=0.1)
    module(torch.ones(1, 2)).sum().backward()
    saved_by.step()
    config = {"train": {"epochs": 1}}
    save_checkpoint(tmp_path / "c", {"m": module}, saved_by, {"config": config, "step": 1, "epoch": 1, "complete": False})
    fused = torch.optim.Adam(module.parameters(), lr=0.1, fused=True)  # fused Adam runs on the CPU too
    loop.resume(tmp_path / "c", torch.device("cpu"), config, {"m": module}, fused)
    assert fused.param_groups[0]["fused"] is True and fused.state  # state restored, implementation kept
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        assert loop.adam([torch.nn.Parameter(torch.ones(3, device="cuda"))], 0.1, torch.device("cuda")).param_groups[0]["fused"]


def test_a_checkpoint_from_before_bf16_resumes(world, tmp_path):
    """A checkpoint that does not name bf16 was written in fp32: it resumes with bf16 off, not with it on."""
    train_phase1(world, world.manifest, world.gallery, tmp_path, replace(P1, epochs=1), TINY_MODEL, runtime=RT1)
    state_path = tmp_path / "checkpoint" / "state.json"
    import json

    state = json.loads(state_path.read_text())
    del state["config"]["train"]["bf16"]
    state_path.write_text(json.dumps(state))
    train_phase1(world, world.manifest, world.gallery, tmp_path, replace(P1, epochs=2), TINY_MODEL, runtime=RT1)
    with pytest.raises(TrainingError, match="different train"):
        train_phase1(world, world.manifest, world.gallery, tmp_path, replace(P1, epochs=3, bf16=True), TINY_MODEL, runtime=RT1)


@pytest.mark.parametrize("bad", [{"check_every": 0}, {"checkpoint_every": -1}, {"checkpoint_minutes": float("nan")}])
def test_runtime_config_is_checked(bad):
    with pytest.raises(TrainingError, match="runtime"):
        loop.RuntimeConfig(**bad)


@pytest.mark.slow
def test_compile_trains_like_eager(world, tmp_path, monkeypatch):
    """``runtime.compile``: the trained modules go through torch.compile (dynamic shapes, the valid-frame count
    changing every step) and train as eager does. Compiled with the ``aot_eager`` backend: TorchDynamo's capture
    and AOTAutograd's joint graph, where a module that does not compile fails, without inductor's C++ codegen
    (2-3 minutes on 2 CPU cores for this tiny model, and PyTorch's own to test)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compile_(module, backend="aot_eager", **kw))
    p1 = replace(P1, epochs=1)
    eager = train_phase1(world, world.manifest, world.gallery, tmp_path / "e", p1, TINY_MODEL, runtime=RT1)
    compiled = train_phase1(world, world.manifest, world.gallery, tmp_path / "c", p1, TINY_MODEL, runtime=replace(RT1, compile=True))
    assert abs(compiled["train_loss"] - eager["train_loss"]) < 1e-3 * abs(eager["train_loss"])
