"""A run's checkpoint: everything the server needs to go on after a crash, written after every round.

Flower keeps no state of a run that can be continued: a SuperLink killed mid-run marks it failed, and
the ServerApp's memory is gone. The checkpoint holds the global weights, the masks and their version,
each node's declared |D_k|, the node keys that order sampling and aggregation, the results log and the
run config. Nothing else decides what a run does next: client sampling and every client's random
streams are functions of (seed, round, node), so a run resumed from round r repeats what the
uninterrupted run did after r, bit for bit in simulation.

The file is replaced atomically (temporary file, fsync, rename) and the one before it is kept as
``checkpoint.prev.pt``: a crash while writing leaves the last good checkpoint readable, and a damaged
newest one falls back to the previous round's.
"""

from __future__ import annotations

import os
import uuid
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.common import log

from common.protocol.config import ConfigError, RunConfig

FORMAT = 1
NAME = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
# Keys a resumed run may change: where data lives, how long to wait and what hardware computes, nothing
# that changes the maths (a CUDA device rounds differently from the CPU, but runs the same method). A
# checkpoint from before the `device` key (absent: the CPU) resumes under any value.
OPERATIONAL_KEYS = frozenset({"resume", "round-timeout", "node-wait-timeout", "data-dir", "download", "device"})


def save_checkpoint(folder: Path, payload: dict[str, Any]) -> Path:
    """Write ``folder/checkpoint.pt`` atomically, keeping the one it replaces as ``checkpoint.prev.pt``."""
    folder.mkdir(parents=True, exist_ok=True)
    path, tmp = folder / NAME, folder / f".{NAME}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, folder / PREVIOUS)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # the renames themselves survive a power loss only once the folder is on disk
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _read(path: Path) -> dict[str, Any]:
    # weights_only: a checkpoint is tensors, numbers and strings; nothing in it may run code when read
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"not a format-{FORMAT} checkpoint")
    return payload


def load_checkpoint(folder: Path) -> dict[str, Any]:
    """The newest readable checkpoint in ``folder``: ``checkpoint.pt``, else ``checkpoint.prev.pt``."""
    problems = []
    for name in (NAME, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        try:
            payload = _read(path)
        except Exception as exc:  # noqa: BLE001 - a damaged file fails in torch, zipfile, pickle or struct
            problems.append(f"{path} is unreadable ({type(exc).__name__}: {exc})")
            log(WARNING, "%s; trying the one before it", problems[-1])
            continue
        if problems:
            log(WARNING, "resuming from the previous checkpoint, round %d", payload["round"])
        return payload
    if problems:
        raise ConfigError(
            "cannot resume: " + "; ".join(problems) + ". Start the run again without resume under a new run-name"
        )
    raise ConfigError(
        f"cannot resume: no checkpoint in {folder}. The run either finished (its results.json and model.pt "
        "are complete) or never got through a round; check results-dir and run-name, or start it without resume"
    )


#: Keys whose default changed after they were added, with what a run did before they existed: a
#: checkpoint without them ran that, not today's default (BaE's L1 proximal step became the default
#: on 2026-12-02).
BEFORE_THE_KEY: dict[str, Any] = {"bae-step": "loss", "bae-penalty": "l2"}


def check_resumable(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise ConfigError unless ``current`` is the checkpointed run's config up to :data:`OPERATIONAL_KEYS`.

    A key the checkpoint lacks was added to the app after it was written, and a new key's default keeps
    the old behaviour, so it counts as its default: the run resumes unless the key is set otherwise.
    Where a default changed later, the key counts as what the app did before: :data:`BEFORE_THE_KEY`."""
    saved = {**RunConfig().as_dict(), **BEFORE_THE_KEY, **saved}
    changed = sorted(
        key
        for key in saved.keys() | current.keys()
        if key not in OPERATIONAL_KEYS and saved.get(key) != current.get(key)
    )
    if changed:
        details = ", ".join(f"{k} = {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError(
            f"cannot resume with a different run config ({details}): resume with the checkpoint's values, "
            f"or start a new run under another run-name"
        )


def discard_checkpoints(folder: Path) -> None:
    """Remove the checkpoints of a finished run: its results.json and model.pt hold everything."""
    for name in (NAME, PREVIOUS):
        (folder / name).unlink(missing_ok=True)
