"""Training checkpoints: weights and optimizer state as safetensors, config and progress as JSON, atomic.

Layout of ``<dir>/``: ``weights.safetensors`` (module state dicts, keys ``<module>.<param>``),
``optimizer.safetensors`` (Adam's per-parameter tensors, keys ``state.<id>.<name>``) and ``state.json``
(config, step, epoch, param groups, anything else the loop records). The directory is replaced in one
rename, so an interrupted write leaves the previous checkpoint whole.

A finished run's checkpoint says ``complete``; once the stage's outputs made from it are written it is
also ``delivered`` (:func:`mark_delivered`). Only a delivered checkpoint is stale when the stage runs
again: a finished one whose outputs were lost (a kill or a full disk while writing the bundle) is
resumed, which skips straight to writing them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vidtag.errors import CheckpointError  # re-exported: `from vidtag.train.checkpoint import CheckpointError` works
from vidtag.io import atomic_path, write_error_reason, write_json_atomic

WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    state: dict[str, Any]  # config, step, epoch, ...

    def module_state(self, name: str) -> dict[str, torch.Tensor]:
        prefix = name + "."
        return {k[len(prefix) :]: v for k, v in self.weights.items() if k.startswith(prefix)}


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: str | Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> Path:
    """Write ``modules`` (name -> module), the optimizer and ``state`` (JSON-able) to ``directory`` atomically."""
    directory = Path(directory)
    weights = {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}
    state = dict(state)
    try:
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            save_file(weights, tmp / WEIGHTS)
            if optimizer is not None:
                tensors, meta = _flatten_optimizer(optimizer)
                save_file(tensors, tmp / OPTIMIZER)
                state["optimizer"] = meta
            (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True, allow_nan=False) + "\n")
    except (OSError, SafetensorError) as e:  # a full disk (safetensors says so as a SafetensorError): the previous checkpoint was not touched
        raise CheckpointError(f"cannot write checkpoint {directory} ({write_error_reason(e)}); the previous checkpoint is "
                              "kept: free space, then run again to resume from it") from None
    return directory


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint | None:
    """The checkpoint in ``directory``, or None when there is none; an incomplete one is an error."""
    directory = Path(directory)
    if not directory.exists():
        return None
    missing = [f for f in (WEIGHTS, STATE) if not (directory / f).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete (missing {missing}); delete it to start afresh")
    state = read_state(directory)
    try:
        weights = load_file(directory / WEIGHTS, device=str(device))
        optimizer = None
        if "optimizer" in state and (directory / OPTIMIZER).exists():
            optimizer = _unflatten_optimizer(load_file(directory / OPTIMIZER, device=str(device)), state.pop("optimizer"))
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint {directory} cannot be read ({type(e).__name__}: {e}); delete it to "
                              "start afresh") from None
    return Checkpoint(weights, optimizer, state)


def read_state(directory: str | Path) -> dict[str, Any] | None:
    """``state.json`` of the checkpoint in ``directory`` (None when there is none); unreadable is an error."""
    path = Path(directory) / STATE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({e}); delete {directory} to start afresh") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a JSON object; delete {directory} to start afresh")
    return state


def mark_delivered(directory: str | Path) -> None:
    """Record that the outputs made from this finished checkpoint were written (see the module docstring)."""
    state = read_state(directory)
    if state is not None and state.get("complete") and not state.get("delivered"):
        write_json_atomic(Path(directory) / STATE, {**state, "delivered": True})


def restore(ckpt: Checkpoint, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load weights (strict) and optimizer state from ``ckpt`` into the given objects."""
    for name, module in modules.items():
        try:
            module.load_state_dict(ckpt.module_state(name), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint weights for {name!r} do not match the model: {str(e).splitlines()[0]}") from None
    if optimizer is not None and ckpt.optimizer is not None:
        optimizer.load_state_dict(ckpt.optimizer)
