"""Checkpoints: everything a run needs to continue, written atomically.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python
values (dict, list, tuple, str, int, float, bool, None), so it loads with
``torch.load(weights_only=True)``: nothing beyond that is ever unpickled.

Layout (``FORMAT`` = "apex-dqn-checkpoint", ``VERSION`` = 1)::

    format, version         str, int
    env_id, num_actions     the game (canonical id) and its action count
    model, target           online / target QNetwork state dicts
    optimizer               optimizer state dict
    updates                 int
    counters                dict[str, int | float | list]: updates, frames,
                            transitions, episodes, weight_version, elapsed_s, ...
    config                  `Config.to_dict()`
    rng                     torch (uint8 tensor), cuda (list of tensors), numpy
                            (MT19937 state as plain values), python (random state)

Writing goes to ``<path>.tmp-<pid>`` first, is fsync'ed, then ``os.replace``d over
``path``, and the directory is fsync'ed (so the rename itself survives a power
cut): a crash mid-write leaves the previous checkpoint intact. A temporary file
that a killed process left behind (its pid is gone) is deleted by the next save
in that directory. A failed write (a full disk: ENOSPC) raises ``OSError`` and
leaves the previous file and no temporary one.

`save_checkpoint` with ``keep=K`` writes ``<stem>-<updates>.pt`` and makes
``path`` (``checkpoint.pt``) a hard link to it (a copy where links are not
possible), then deletes all but the K numbered files written last (by
modification time, not by name: after ``--resume`` of an older checkpoint the
new run's files are the ones kept, not the abandoned future): the last good
checkpoints survive a bad one.
"""

from __future__ import annotations

import glob
import io
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch

FORMAT = "apex-dqn-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or belongs to another game; the message
    says which file, what is wrong and what to do."""


def rng_state() -> dict[str, Any]:
    """torch, CUDA, numpy (global) and python ``random`` states as safe plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [str(kind), torch.from_numpy(np.asarray(keys, np.int64)), pos, has_gauss, cached],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state` (CUDA states are skipped when the device count differs)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(
    path: str | os.PathLike,
    learner_state: dict[str, Any],
    counters: dict[str, Any],
    config: dict[str, Any],
    env_id: str,
    num_actions: int,
    keep: int | None = None,
) -> str:
    """Atomically write a checkpoint; returns the path written.

    learner_state: `Learner.state_dict()` (model, target, optimizer, updates)
    counters:      plain values (ints, floats, lists of them)
    config:        `Config.to_dict()`
    keep:          None: write ``path`` only; K: a numbered file, ``path`` linked to
                   it, the newest K numbered files kept (returns the numbered path)
    """
    path = os.fspath(path)
    if keep is not None:
        return _save_numbered(path, learner_state, counters, config, env_id, num_actions, keep)
    state = {
        "format": FORMAT,
        "version": VERSION,
        "env_id": env_id,
        "num_actions": int(num_actions),
        **learner_state,
        "counters": dict(counters),
        "config": config,
        "rng": rng_state(),
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    sweep_stale_tmp(directory)
    tmp = f"{path}.tmp-{os.getpid()}"
    # Serialized in memory first: torch.save straight into a file turns a full disk
    # into "RuntimeError: [enforce fail at inline_container.cc] unexpected pos";
    # Python's own write raises OSError(ENOSPC), which callers can tell apart.
    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        with open(tmp, "wb") as fh:
            fh.write(buf.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(directory)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


_TMP = re.compile(r".+\.tmp-(\d+)")


def sweep_stale_tmp(directory: str) -> list[str]:
    """Delete ``*.tmp-<pid>`` files in ``directory`` whose writer process is gone
    (a kill -9 mid-write); returns the paths deleted."""
    gone = []
    try:
        names = os.listdir(directory)
    except OSError:
        return gone
    for name in names:
        m = _TMP.fullmatch(name)
        if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            gone.append(os.path.join(directory, name))
        except OSError:
            pass
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OverflowError:
        return False
    return True


def fsync_dir(directory: str) -> None:
    """fsync a directory, so a rename into it is durable (best effort: not every
    filesystem allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_numbered(
    path: str,
    learner_state: dict[str, Any],
    counters: dict[str, Any],
    config: dict[str, Any],
    env_id: str,
    num_actions: int,
    keep: int,
) -> str:
    stem, ext = os.path.splitext(path)
    updates = int(counters.get("updates", learner_state.get("updates", 0)))
    numbered = f"{stem}-{updates:010d}{ext or '.pt'}"
    save_checkpoint(numbered, learner_state, counters, config, env_id, num_actions)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        try:
            os.link(numbered, tmp)
        except OSError:
            shutil.copyfile(numbered, tmp)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    pattern = re.compile(re.escape(os.path.basename(stem)) + r"-\d{10}" + re.escape(ext or ".pt"))
    mine = [
        p for p in glob.glob(f"{glob.escape(stem)}-*") if pattern.fullmatch(os.path.basename(p))
    ]
    # newest written last; the file just written is newest even on a coarse clock
    mine.sort(key=lambda p: (p == numbered, os.stat(p).st_mtime_ns, p))
    for old in mine[:-keep]:
        os.unlink(old)
    return numbered


def checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """The run settings stored in a checkpoint (`Config.to_dict()` form); raises
    `CheckpointError` when the file is not a readable checkpoint."""
    return load_checkpoint(path)["config"]


def load_resume(cfg: Any, env_id: str, num_actions: int | None = None) -> dict[str, Any]:
    """The checkpoint of ``--resume`` (``cfg.run.resume``), checked against the run
    that would continue it: its game, its head, torso and optimizer, and its
    action count when known (``train`` knows it; ``train --check`` starts no
    emulator, so it checks everything else). Raises `CheckpointError`."""
    return load_checkpoint(
        cfg.run.resume,
        expect_env=env_id,
        expect_actions=num_actions,
        expect_dueling=cfg.learner.dueling,
        expect_network=cfg.network(),
        expect_optimizer=cfg.learner.optimizer,
    )


def load_checkpoint(
    path: str | os.PathLike,
    expect_env: str | None = None,
    expect_actions: int | None = None,
    expect_dueling: bool | None = None,
    expect_optimizer: str | None = None,
    expect_network: str | None = None,
) -> dict[str, Any]:
    """Read and check a checkpoint (tensors on CPU); raises `CheckpointError`.

    expect_env:       refuse a checkpoint of another game (ids compared after
                      `common.env.resolve_env`, so ``pong`` matches ``ALE/Pong-v5``)
    expect_actions:   refuse a checkpoint with another action count
    expect_dueling:   refuse a checkpoint of the other head (dueling or plain);
                      read from the model's weights, not from its config
    expect_optimizer: refuse a checkpoint of another optimizer (``adam`` or
                      ``rmsprop``); read from the optimizer state's hyperparameters
    expect_network:   refuse a checkpoint of the other torso (``nature`` or
                      ``small``); read from the model's weights
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"checkpoint {path} does not exist; check the path (checkpoints are "
            f"written as LOGDIR/checkpoint.pt)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, unsafe globals, ...
        raise CheckpointError(_unreadable(path, exc)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is not an apex-dqn checkpoint (no '{FORMAT}' marker); "
            f"pass a file written by 'apex-dqn train'."
        )
    missing = [
        k
        for k in ("model", "target", "optimizer", "counters", "config", "env_id", "num_actions")
        if k not in state
    ]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {', '.join(missing)}; it is incomplete. Use an "
            f"earlier checkpoint or start a new run without --resume."
        )
    if state.get("version", 0) > VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state['version']}, newer than this "
            f"apex-dqn ({VERSION}); upgrade apex-dqn to load it."
        )
    if expect_env is not None and not _same_env(state["env_id"], expect_env):
        raise CheckpointError(
            f"checkpoint {path} was trained on {state['env_id']}, not {expect_env}; "
            f"resume with --env {state['env_id']} or start a new run without --resume."
        )
    if expect_actions is not None and int(state["num_actions"]) != int(expect_actions):
        raise CheckpointError(
            f"checkpoint {path} has {state['num_actions']} actions ({state['env_id']}) but "
            f"the environment has {expect_actions}; check --full-action-space or start a "
            f"new run without --resume."
        )
    if expect_dueling is not None:
        dueling = is_dueling(state["model"])
        if dueling != expect_dueling:
            flag = "--dueling" if dueling else "--no-dueling"
            raise CheckpointError(
                f"checkpoint {path} has a {'dueling' if dueling else 'plain'} Q-network head "
                f"but this run asks for a {'dueling' if expect_dueling else 'plain'} one; "
                f"resume with {flag} (the architecture must match) or start a new run "
                f"without --resume."
            )
    if expect_network is not None:
        from common.network import network_of

        torso = network_of(state["model"])
        if torso != expect_network:
            raise CheckpointError(
                f"checkpoint {path} has the {torso} Q-network torso but this run asks for "
                f"--network {expect_network}; resume with --network {torso} (the "
                f"architecture must match) or start a new run without --resume."
            )
    if expect_optimizer is not None:
        used = optimizer_name(state["optimizer"])
        if used is not None and used != expect_optimizer:
            raise CheckpointError(
                f"checkpoint {path} was trained with --optimizer {used}, this run asks for "
                f"{expect_optimizer}; resume with --optimizer {used} (its state cannot be "
                f"converted) or start a new run without --resume."
            )
    return state


def is_dueling(model_state: dict[str, Any]) -> bool:
    """Whether a `QNetwork` state dict has the dueling value/advantage head."""
    return any(k.startswith("advantage.") for k in model_state)


def optimizer_name(optimizer_state: dict[str, Any]) -> str | None:
    """``adam`` or ``rmsprop`` from an optimizer state dict's hyperparameters
    (Adam's groups hold ``betas``, RMSprop's ``alpha`` and ``centered``);
    None when they say neither."""
    groups = optimizer_state.get("param_groups") or [{}]
    if "betas" in groups[0]:
        return "adam"
    if "centered" in groups[0]:
        return "rmsprop"
    return None


def _unreadable(path: str, exc: Exception) -> str:
    """The error for a file torch cannot load safely, without torch's advice to
    retry with ``weights_only=False`` (that would run whatever code the file holds)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return (
            f"checkpoint {path} holds Python objects other than tensors and plain values "
            f"(it references {found.group(1)}): it was not written by apex-dqn, or was "
            "altered. apex-dqn loads checkpoints with torch.load(weights_only=True) only and "
            "never unpickles anything else, because loading such a file could run code it "
            "carries. Use a checkpoint written by 'apex-dqn train' (an earlier one from the "
            "same LOGDIR), or start a new run without --resume."
        )
    detail = text.partition("WeightsUnpickler error:")[2] or text
    lines = [ln.strip() for ln in detail.splitlines() if ln.strip()]
    lines = [ln for ln in lines if "weights_only" not in ln]
    first = lines[0].split(". ")[0][:200] if lines else ""
    return (
        f"checkpoint {path} is unreadable ({type(exc).__name__}"
        f"{': ' + first if first else ''}); the file is truncated, corrupt or not an "
        "apex-dqn checkpoint. Use an earlier checkpoint or start a new run without --resume."
    )


def _same_env(a: str, b: str) -> bool:
    if a == b:
        return True
    from common.env import UnknownEnvError, resolve_env

    try:
        return resolve_env(a).env_id == resolve_env(b).env_id
    except UnknownEnvError:
        return False
