"""Checkpoints: exact resume, foreign and corrupt files refused, atomic writes."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import learner.checkpoint as ckpt_mod
from learner.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from learner.learner import Learner
from tests.test_learner import make_batch, make_cfg

COUNTERS = {
    "updates": 3,
    "frames": 123_456,
    "transitions": 30_000,
    "episodes": 17,
    "weight_version": 5,
    "elapsed_s": 61.5,
    "recent_returns": [1.0, -1.0, 1.0],
}


def trained(steps: int = 3, optimizer: str = "adam") -> Learner:
    learner = Learner(make_cfg(optimizer=optimizer, target_update=2), 3, "cpu")
    for i in range(steps):
        learner.step(make_batch(i))
    return learner


def save(learner: Learner, path: str, env_id: str = "ApexCatch-v0", actions: int = 3) -> str:
    cfg = make_cfg()
    return save_checkpoint(path, learner.state_dict(), COUNTERS, cfg.to_dict(), env_id, actions)


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_resume_restores_counters_and_optimizer_exactly(tmp_path, optimizer: str) -> None:
    a = trained(3, optimizer)
    path = save(a, str(tmp_path / "c.pt"))
    state = load_checkpoint(path, expect_env="ApexCatch-v0", expect_actions=3)
    assert state["counters"] == COUNTERS
    assert state["config"]["env"]["env"] == "ApexCatch-v0"

    b = Learner(make_cfg(optimizer=optimizer, target_update=2), 3, "cpu")
    b.online.torso[0].weight.data.add_(1.0)  # make sure loading overwrites everything
    b.load_state_dict(state)
    assert b.updates == a.updates == 3
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name, value in sa["state"][k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["state"][k][name]))
    # the next update is bit-identical: same params, same moments, same target
    batch = make_batch(99)
    out_a, out_b = a.step(batch), b.step(batch)
    assert out_a["loss"] == out_b["loss"] and b.updates == 4
    for pa, pb in zip(a.online.parameters(), b.online.parameters(), strict=True):
        assert torch.equal(pa, pb)
    for pa, pb in zip(a.target.parameters(), b.target.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_resume_takes_moments_from_the_checkpoint_and_hyperparameters_from_the_run(
    tmp_path,
) -> None:
    from learner.learner import RMSPROP_EPS

    a = trained(3, "rmsprop")
    state = a.state_dict()
    for group in state["optimizer"]["param_groups"]:  # as a checkpoint of an older run
        group["eps"], group["lr"] = 1.5e-7, 0.5
    path = save_checkpoint(
        str(tmp_path / "c.pt"), state, COUNTERS, make_cfg().to_dict(), "ApexCatch-v0", 3
    )
    b = Learner(make_cfg(optimizer="rmsprop", target_update=2), 3, "cpu")
    b.load_state_dict(load_checkpoint(path, expect_env="ApexCatch-v0", expect_actions=3))
    for ga, gb in zip(a.optimizer.param_groups, b.optimizer.param_groups, strict=True):
        assert gb["eps"] == RMSPROP_EPS != 1.5e-7
        assert gb["lr"] == ga["lr"] != 0.5
    for k, moments in a.optimizer.state_dict()["state"].items():
        for name, value in moments.items():
            assert torch.equal(torch.as_tensor(value), b.optimizer.state_dict()["state"][k][name])


def test_contents_load_with_weights_only_and_rng_round_trips(tmp_path) -> None:
    path = save(trained(1), str(tmp_path / "c.pt"))
    raw = torch.load(path, weights_only=True)  # nothing beyond tensors and plain values
    assert raw["format"] == "apex-dqn-checkpoint" and raw["num_actions"] == 3
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = ckpt_mod.rng_state()
    expect = (torch.rand(3), np.random.rand(3), random.random())
    ckpt_mod.set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0])
    np.testing.assert_array_equal(expect[1], got[1])
    assert expect[2] == got[2]


def test_other_game_and_action_count_refused(tmp_path) -> None:
    path = save(trained(1), str(tmp_path / "c.pt"))
    with pytest.raises(CheckpointError, match=r"trained on ApexCatch-v0, not ALE/Pong-v5"):
        load_checkpoint(path, expect_env="ALE/Pong-v5")
    with pytest.raises(CheckpointError, match=r"has 3 actions .* the environment has 6"):
        load_checkpoint(path, expect_actions=6)
    pong = save(trained(1), str(tmp_path / "p.pt"), env_id="ALE/Pong-v5", actions=3)
    assert load_checkpoint(pong, expect_env="pong")["env_id"] == "ALE/Pong-v5"  # same game
    with pytest.raises(CheckpointError, match=r"ALE/Pong-v5, not PongNoFrameskip-v4"):
        load_checkpoint(pong, expect_env="PongNoFrameskip-v4")


def test_corrupt_truncated_missing_and_pickled_refused(tmp_path) -> None:
    path = save(trained(1), str(tmp_path / "c.pt"))
    data = open(path, "rb").read()
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"t\.pt is unreadable .*truncated, corrupt"):
        load_checkpoint(str(truncated))
    garbage = tmp_path / "g.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="unreadable") as err:
        load_checkpoint(str(garbage))
    assert "weights_only" not in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    plain = tmp_path / "plain.pt"
    torch.save({"model": {}}, plain)
    with pytest.raises(CheckpointError, match="not an apex-dqn checkpoint"):
        load_checkpoint(str(plain))
    pickled = tmp_path / "evil.pt"
    torch.save({"format": "apex-dqn-checkpoint", "x": Unsafe()}, pickled)
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors") as err:
        load_checkpoint(str(pickled))
    msg = str(err.value)
    # torch's own advice (re-run with weights_only=False) would run the file's code
    assert "weights_only=False" not in msg and "Re-running" not in msg
    assert "test_checkpoint.Unsafe" in msg and "Use a checkpoint written by" in msg


class Unsafe:
    """A class weights_only loading must refuse to instantiate."""


def test_other_architecture_and_optimizer_refused(tmp_path) -> None:
    adam = save(trained(1, "adam"), str(tmp_path / "a.pt"))
    with pytest.raises(CheckpointError, match=r"dueling Q-network head .* resume with --dueling"):
        load_checkpoint(adam, expect_dueling=False)
    with pytest.raises(CheckpointError, match=r"--optimizer adam, this run asks for rmsprop"):
        load_checkpoint(adam, expect_optimizer="rmsprop")
    assert load_checkpoint(adam, expect_dueling=True, expect_optimizer="adam")["updates"] == 1
    plain = Learner(make_cfg(optimizer="rmsprop", dueling=False), 3, "cpu")
    path = save(plain, str(tmp_path / "p.pt"))
    with pytest.raises(CheckpointError, match=r"plain Q-network head .* resume with --no-dueling"):
        load_checkpoint(path, expect_dueling=True)
    with pytest.raises(CheckpointError, match=r"--optimizer rmsprop, this run asks for adam"):
        load_checkpoint(path, expect_optimizer="adam")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--no-dueling"], "resume with --dueling"),
        (["--optimizer", "rmsprop"], "resume with --optimizer adam"),
        (["--env", "breakout"], "resume with --env ApexCatch-v0"),
    ],
)
def test_cli_resume_mismatch_stops_before_ray(tmp_path, capsys, flags, fragment) -> None:
    """Through `apex-dqn train --resume`: exit 2 with what to fix, before Ray,
    Redis or any actor starts; the checkpoint is untouched."""
    import ray

    from deploy.cli import main

    path = save(trained(1, "adam"), str(tmp_path / "c.pt"))
    before = open(path, "rb").read()
    argv = ["train", "--env", "ApexCatch-v0", "--resume", path, "--logdir", str(tmp_path / "r")]
    had_ray = ray.is_initialized()  # another test's session Ray may be up already
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err
    assert ray.is_initialized() == had_ray  # no Ray started
    assert not (tmp_path / "r" / "redis").exists()  # no embedded redis-server (starts before Ray)
    assert open(path, "rb").read() == before


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch) -> None:
    path = save(trained(1), str(tmp_path / "c.pt"))
    before = open(path, "rb").read()

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save(trained(1), path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["c.pt"]  # no temp file left behind
    monkeypatch.undo()
    assert load_checkpoint(path)["counters"]["updates"] == 3


def test_resume_alone_continues_the_run_of_the_checkpoint(tmp_path) -> None:
    """`apex-dqn train --resume CKPT` alone: the run's own settings, its logdir
    (where the checkpoint is, so the embedded replay's AOF is found again), no
    password carried over; flags given with it still win."""
    from common.config import Config
    from deploy.cli import build_parser, config_from_args

    cfg = Config()
    cfg.env.env = "ApexCatch-v0"
    cfg.actor.envs_per_actor = 8
    cfg.replay.capacity = 30_000
    cfg.replay.min_replay = 1_000
    cfg.replay.redis_url = "redis://apex:hunter2hunter2@db:6379/0"
    cfg.run.logdir = "/somewhere/else"  # where the run was, maybe on another machine
    run_dir = tmp_path / "run"
    path = save_checkpoint(
        run_dir / "checkpoint.pt", trained(1).state_dict(), COUNTERS, cfg.to_dict(),
        "ApexCatch-v0", 3,
    )  # fmt: skip
    args = build_parser().parse_args(["train", "--resume", path])
    resumed = config_from_args(args, warn=lambda _: None)
    assert resumed.env.env == "ApexCatch-v0" and resumed.actor.envs_per_actor == 8
    assert resumed.replay.capacity == 30_000 and resumed.replay.min_replay == 1_000
    assert resumed.run.logdir == str(run_dir.resolve()) and resumed.run.resume == path
    assert resumed.replay.redis_url == ""  # stored redacted: given again, or embedded
    args = build_parser().parse_args(["train", "--resume", path, "--envs-per-actor", "4"])
    assert config_from_args(args, warn=lambda _: None).actor.envs_per_actor == 4


@pytest.mark.parametrize("network", ["nature", "small"])
def test_fused_adam_round_trips_through_a_checkpoint_and_resume(tmp_path, network: str) -> None:
    """The CPU learner's fused Adam (torch >= 2.4): its moments and step counts come
    back through a checkpoint and ``train --resume`` (the launcher's own resume
    loading), still fused, and the next update is bit-identical."""
    from deploy.cli import build_parser, config_from_args
    from deploy.launcher import _load_resume

    a = Learner(make_cfg(target_update=2, network=network), 3, "cpu")
    for i in range(3):
        a.step(make_batch(i))
    assert all(g["fused"] for g in a.optimizer.param_groups)
    cfg = make_cfg(target_update=2, network=network)
    path = save_checkpoint(
        tmp_path / "run" / "checkpoint.pt", a.state_dict(), COUNTERS, cfg.to_dict(),
        "ApexCatch-v0", 3,
    )  # fmt: skip
    resumed = config_from_args(
        build_parser().parse_args(["train", "--resume", path]), warn=lambda _: None
    )
    assert resumed.learner.network == network
    b = Learner(resumed, 3, "cpu")
    b.load_state_dict(_load_resume(resumed, "ApexCatch-v0", 3))
    assert all(g["fused"] for g in b.optimizer.param_groups)
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name, value in sa[k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[k][name]))
    batch = make_batch(99)
    assert a.step(batch)["loss"] == b.step(batch)["loss"]
    for pa, pb in zip(a.online.parameters(), b.online.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_other_network_refused_on_resume(tmp_path) -> None:
    a = Learner(make_cfg(network="small"), 3, "cpu")
    path = save(a, str(tmp_path / "c.pt"))
    with pytest.raises(CheckpointError, match="small Q-network torso.*--network nature"):
        load_checkpoint(path, expect_network="nature")
    assert load_checkpoint(path, expect_network="small")["num_actions"] == 3


def test_train_check_refuses_a_resume_that_train_would_refuse(tmp_path, capsys) -> None:
    """``train --check --resume`` applies train's checks of the checkpoint (torso,
    head, optimizer), not only its game."""
    from deploy.cli import main

    cfg = make_cfg(network="small")
    path = save_checkpoint(
        tmp_path / "run" / "checkpoint.pt", Learner(cfg, 3, "cpu").state_dict(), COUNTERS,
        cfg.to_dict(), "ApexCatch-v0", 3,
    )  # fmt: skip
    assert main(["train", "--resume", path, "--check"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", path, "--network", "nature", "--check"]) == 2
    assert "--network" in capsys.readouterr().err
    assert main(["train", "--resume", path, "--optimizer", "rmsprop", "--check"]) == 2
    assert "rmsprop" in capsys.readouterr().err


def test_keep_newest_by_write_order_after_resuming_an_older_checkpoint(tmp_path) -> None:
    """Resumed from update 100 after the run had reached 300: the new run's files
    (150, 160) are kept, the abandoned future (200, 300) goes first."""
    path = str(tmp_path / "checkpoint.pt")
    learner = trained(1)
    for updates in (100, 200, 300):
        save_checkpoint(path, learner.state_dict(), {**COUNTERS, "updates": updates},
                        make_cfg().to_dict(), "ApexCatch-v0", 3, keep=3)  # fmt: skip
    base = os.stat(tmp_path / "checkpoint-0000000300.pt").st_mtime_ns
    for updates in (150, 160):
        written = save_checkpoint(path, learner.state_dict(), {**COUNTERS, "updates": updates},
                                  make_cfg().to_dict(), "ApexCatch-v0", 3, keep=3)  # fmt: skip
        os.utime(written, ns=(base + updates, base + updates))  # a coarse clock: force order
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*.pt"))
    assert kept == ["checkpoint-0000000150.pt", "checkpoint-0000000160.pt",
                    "checkpoint-0000000300.pt"]  # fmt: skip
    assert load_checkpoint(path)["counters"]["updates"] == 160


def test_a_killed_writers_temporary_file_is_swept(tmp_path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f"checkpoint.pt.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f"best.pt.tmp-{os.getppid()}"  # a live writer's file stays
    live.write_bytes(b"being written")
    save(trained(1), str(tmp_path / "checkpoint.pt"))
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt.tmp-" + str(os.getppid()),
                                                          "checkpoint.pt"]  # fmt: skip
