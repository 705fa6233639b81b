"""Committed results: a study notebook opened as a reader opens it shows the study's real numbers, fast.

Every expensive computation of a study notebook (a training run, a measurement on a trained policy, a timing)
goes through ``Results.get(kind, inputs, compute)``. Its key is a hash of the computation's name and of the
inputs it depends on (configs as ``TrainConfig.to_dict()``, the task's ``describe()``, sizes, seeds), so a stored
value answers exactly one question. What a notebook stored lives in one committed file per notebook,
``figures/runs/<notebook>.json.gz``. The mode comes from the environment (``PROGRPO_RESULTS``):

    read     (the default: a reader in JupyterLab) a stored value whose key matches is read; anything else is
             computed (a reader who changes a config gets that arm trained) and not stored;
    rebuild  (``make reproduce``) everything is computed, and the file is rewritten with what this run used;
    off      (nbval's quick profile) everything is computed; nothing is read or stored.

Timings are stored with the runs they belong to, so a notebook read back shows the seconds of the machine that
ran ``make reproduce``; the prose never types them (``tests/test_results.py``). ``tests/test_cache.py``
re-runs a sample of the stored training runs and checks that they come out the same (bit for bit on the machine that
stored them, within the last bits on another CPU model).

Values are JSON with tensors encoded exactly (float32 and float64 round-trip through JSON's shortest repr).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

RUNS = Path(__file__).resolve().parents[2] / "figures" / "runs"
MODE_ENV = "PROGRPO_RESULTS"
MODES = ("read", "rebuild", "off")


def key_of(kind: str, inputs: Any) -> str:
    """The hash of a computation: its ``kind`` and its JSON-able ``inputs``, order-independent for dicts."""
    text = json.dumps({"kind": kind, "inputs": inputs}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def encode(value: Any) -> Any:
    """JSON-able, with tensors as ``{"__tensor__": dtype, "shape", "data"}`` (exact for float32/64 and integers)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return {"__tensor__": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": t.flatten().tolist()}
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    """The inverse of ``encode``."""
    if isinstance(value, dict):
        if "__tensor__" in value:
            return torch.tensor(value["data"], dtype=getattr(torch, value["__tensor__"])).view(value["shape"])
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


class Results:
    """The stored results of one notebook, read or rebuilt as ``mode`` says (``PROGRPO_RESULTS``, default "read")."""

    def __init__(self, notebook: str, mode: str | None = None, folder: Path = RUNS):
        mode = mode or os.environ.get(MODE_ENV, "read")
        if mode not in MODES:
            raise ValueError(f"{MODE_ENV}={mode!r} must be one of {MODES}")
        self.notebook, self.mode, self.path = notebook, mode, Path(folder) / f"{notebook}.json.gz"
        self.stored = self._load() if mode == "read" else {}
        self.used: dict[str, dict] = {}  # what this run computed or read, by key
        self.hits = self.misses = 0

    def _load(self) -> dict:
        if not self.path.exists():
            return {}
        with gzip.open(self.path, "rt") as f:
            return json.load(f)["entries"]

    def get(self, kind: str, inputs: Any, compute: Callable[[], Any]) -> Any:
        """The stored value of ``kind`` at ``inputs`` if there is one (read mode), else ``compute()``."""
        key = key_of(kind, inputs)
        if key in self.stored:
            self.hits += 1
            entry = self.stored[key]
        else:
            self.misses += 1
            entry = {"kind": kind, "inputs": inputs, "value": encode(compute())}
        self.used[key] = entry
        return decode(entry["value"])

    def missing(self, kind: str, inputs_by_name: dict) -> dict:
        """Of ``{name: inputs}``, those with no stored value (the ones a batch computation must still run)."""
        return {name: inputs for name, inputs in inputs_by_name.items() if key_of(kind, inputs) not in self.stored}

    def put(self, kind: str, inputs: Any, value: Any) -> None:
        """Record a value computed outside ``get`` (e.g. by a pool of workers) as used by this run."""
        key = key_of(kind, inputs)
        self.used[key] = self.stored.get(key) or {"kind": kind, "inputs": inputs, "value": encode(value)}

    def save(self) -> Path | None:
        """In rebuild mode, write exactly the entries this run used; otherwise write nothing."""
        if self.mode != "rebuild":
            return None
        if not self.used:  # nothing to store: no file (and none left from an earlier run)
            self.path.unlink(missing_ok=True)
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # entries sorted by key; each value keeps its own order (a measurement's calls 1, 2, ..., 10 stay in order)
        data = json.dumps({"notebook": self.notebook, "entries": dict(sorted(self.used.items()))})
        with gzip.GzipFile(self.path, "wb", mtime=0) as f:  # mtime 0: the same results give the same bytes
            f.write(data.encode())
        return self.path

    def summary(self) -> str:
        return f"{self.hits} results read from {self.path.name}, {self.misses} computed ({self.mode} mode)"
