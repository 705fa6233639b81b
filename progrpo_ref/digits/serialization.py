"""Save and load small modules as safetensors, with their config in the metadata."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

REGENERATE_CMD = "python -m progrpo_ref.digits.pretrain"


def save_module(module: torch.nn.Module, path: str | Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps(asdict(module.config)), **{k: str(v) for k, v in (extra or {}).items()}}
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata=meta)


def load_module(cls, config_cls, path: str | Path, device: str | torch.device = "cpu", regenerate: str = REGENERATE_CMD):
    """Build ``cls(config_cls(**saved config))`` and load its weights; clear errors (naming the ``regenerate`` command)
    if unusable."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} is missing; regenerate it with `{regenerate}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        config = config_cls(**json.loads(meta["config"]))
        module = cls(config)
        module.load_state_dict(load_file(str(path)))
    except Exception as e:  # corrupted file, wrong architecture, missing metadata
        raise RuntimeError(
            f"checkpoint {path} could not be loaded ({type(e).__name__}: {e}); "
            f"regenerate it with `{regenerate}`"
        ) from e
    return module.to(device).eval()


def checkpoint_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
