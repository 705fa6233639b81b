"""Training checkpoints: tensors in safetensors, everything else as JSON in its metadata, written atomically.

One file holds the policy's weights (``model/<name>``; only the trainable ones when some are frozen,
e.g. a LoRA adapter's, see ``policy_state``), the optimizer's tensors
(``optimizer/<param index>/<name>``, e.g. Adam's moments), and, as JSON strings in the safetensors
header, the optimizer's hyperparameters and the trainer's state (config, task, history, RNG state).
The file is written to a temporary name in the same folder and renamed over the target, so an
interrupted write leaves the previous checkpoint intact, never a half-written one; the folder is synced after the
rename, so the new one survives a crash. No pickles.

Read a checkpoint's history without torch: the JSON is in the safetensors header (the first 8 bytes
give its length, little-endian), e.g. ``safe_open(path, framework="numpy").metadata()["state"]``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

FORMAT = "progrpo-ref/train-checkpoint/1"


def save_training_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write ``path`` atomically; ``state`` must be JSON-able."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().to("cpu").contiguous() for k, v in policy_state(model).items()}
    opt = optimizer.state_dict()
    opt_json = {"param_groups": opt["param_groups"], "scalars": {}}
    for idx, values in opt["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{idx}/{name}"] = value.detach().to("cpu").contiguous()
            else:
                opt_json["scalars"].setdefault(str(idx), {})[name] = value
    meta = {"format": FORMAT, "state": json.dumps(state), "optimizer": json.dumps(opt_json)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:  # on disk before it replaces the old checkpoint
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)  # the rename itself on disk: a crash now cannot bring the old file back
    finally:
        if tmp.exists():
            tmp.unlink()


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename inside it is durable (POSIX; Windows cannot open a folder and needs none)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def policy_state(model: torch.nn.Module) -> dict:
    """What a checkpoint keeps of the policy: its whole ``state_dict`` when every parameter is trained;
    otherwise (a LoRA adapter on a frozen network) only the trainable parameters, by name."""
    params = dict(model.named_parameters())
    trainable = {k: p for k, p in params.items() if p.requires_grad}
    return model.state_dict() if len(trainable) == len(params) else trainable


def load_policy_state(model: torch.nn.Module, state: dict) -> None:
    """The inverse of ``policy_state``: load a whole state_dict, or exactly the trainable parameters
    (``ValueError`` naming the difference if the checkpoint holds another set)."""
    params = dict(model.named_parameters())
    trainable = {k for k, p in params.items() if p.requires_grad}
    if len(trainable) == len(params):
        model.load_state_dict(state)
        return
    if set(state) != trainable:
        missing, extra = sorted(trainable - set(state)), sorted(set(state) - trainable)
        raise ValueError(f"the checkpoint's policy tensors are not this policy's trainable parameters: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def load_training_checkpoint(path: str | Path) -> dict:
    """``{"model": state_dict, "optimizer": state_dict, "state": dict}``, tensors on the CPU
    (``load_state_dict`` moves them to the parameters' device; Adam keeps its step count on the CPU).

    A missing file raises ``FileNotFoundError`` naming it; an unreadable one ``ValueError`` naming it.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint {path} does not exist (train with checkpoint_path set first)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state, opt_json = json.loads(meta["state"]), json.loads(meta["optimizer"])
    except Exception as e:  # truncated, corrupted, or another kind of file
        raise ValueError(f"training checkpoint {path} is unreadable ({type(e).__name__}: {e})") from e
    model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    opt_state: dict = {int(i): dict(v) for i, v in opt_json["scalars"].items()}
    for k, v in tensors.items():
        if k.startswith("optimizer/"):
            _, idx, name = k.split("/", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    return {"model": model, "optimizer": {"state": opt_state, "param_groups": opt_json["param_groups"]}, "state": state}
