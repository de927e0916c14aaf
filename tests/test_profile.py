"""Hardware profiles (`common.profile`): what each picks, for CPU and for a (pretend)
CUDA device, as pure logic; and through the CLI, where every flag and config key
wins over the profile and ``--resume`` keeps the resumed run's values."""

from __future__ import annotations

import pytest

from common import profile
from common.config import Config
from deploy.cli import build_parser, config_from_args, main


def cli_cfg(*argv: str) -> Config:
    return config_from_args(build_parser().parse_args(["train", *argv]), warn=lambda _: None)


@pytest.mark.parametrize(
    ("wanted", "device", "cuda", "kind"),
    [
        ("auto", "auto", False, "cpu"),
        ("auto", "auto", True, "gpu"),  # a CUDA device present: the GPU profile
        ("auto", "cpu", True, "cpu"),  # --device cpu on a GPU machine
        ("auto", "cuda:1", False, "gpu"),
        ("cpu", "auto", True, "cpu"),  # --profile wins
        ("gpu", "auto", False, "gpu"),
    ],
)
def test_resolve(wanted: str, device: str, cuda: bool, kind: str) -> None:
    got, reason = profile.resolve(wanted, device, cuda)
    assert got == kind and reason
    with pytest.raises(ValueError, match="choose one of auto, cpu, gpu"):
        profile.resolve("tpu", device, cuda)


def test_cpu_profile_on_two_cores() -> None:
    cfg = Config()
    applied = profile.apply(cfg, "cpu", explicit=set(), cpus=2)
    lc, rc = cfg.learner, cfg.replay
    assert cfg.run.profile == "cpu"
    assert (lc.network, lc.batch_size, lc.target_update, lc.double) == ("nature", 32, 500, False)
    assert (rc.samples_per_insert, rc.min_replay, rc.loader_workers) == (2.0, 10_000, 1)
    assert rc.beta_anneal_updates == 200_000 and cfg.eval.eval_every_minutes == 5.0
    # the split of the cores: one actor, one learner thread
    assert (cfg.actor.actors, lc.torch_threads) == (1, 1)
    assert {c.name for c in applied} >= {"network", "batch_size", "actors", "torch_threads"}
    assert cfg.batch_size("cpu") == 32 and cfg.network() == "nature"
    cfg.validate()


def test_cpu_profile_splits_bigger_machines() -> None:
    cfg = Config()
    profile.apply(cfg, "cpu", explicit=set(), cpus=8)
    assert (cfg.actor.actors, cfg.learner.torch_threads) == (7, 1)
    cfg = Config()
    profile.apply(cfg, "cpu", explicit=set(), cpus=1)
    assert (cfg.actor.actors, cfg.learner.torch_threads) == (1, 1)


def test_gpu_profile_keeps_the_published_apex_settings() -> None:
    cfg = Config()
    profile.apply(cfg, "gpu", explicit=set(), cpus=16)
    lc, rc = cfg.learner, cfg.replay
    assert cfg.run.profile == "gpu"
    assert (lc.network, lc.batch_size, lc.target_update, lc.double) == ("nature", 512, 2500, True)
    assert (rc.samples_per_insert, rc.min_replay, rc.beta_anneal_updates) == (8.0, 20_000, 10**6)
    assert cfg.eval.eval_every_minutes == 10.0
    # the GPU profile leaves the actors and the learner's threads to the defaults
    assert lc.torch_threads == 0 and cfg.actor.actors == Config().actor.actors
    assert cfg.batch_size("cuda") == 512


def test_explicit_settings_win_over_the_profile() -> None:
    cfg = Config()
    cfg.learner.batch_size = 128
    applied = profile.apply(cfg, "cpu", explicit={"batch_size"}, cpus=2)
    assert cfg.learner.batch_size == 128 and "batch_size" not in {c.name for c in applied}
    line = profile.describe("cpu", "test", applied)
    assert line.startswith("profile cpu (test): network nature") and "batch-size" not in line


def test_cli_applies_the_profile_and_flags_win(tmp_path) -> None:
    cfg = cli_cfg("--profile", "cpu", "--batch-size", "64", "--no-double", "--actors", "3")
    assert cfg.run.profile == "cpu" and cfg.to_dict()["run"]["profile"] == "cpu"
    assert cfg.learner.batch_size == 64 and cfg.actor.actors == 3  # flags
    assert cfg.learner.target_update == 500 and cfg.learner.double is False  # profile
    assert "profile cpu (--profile cpu)" in cfg.profile_note
    # a config file's keys win too, even when they equal the field's default
    path = tmp_path / "c.toml"
    path.write_text("[learner]\ntarget_update = 2500\nnetwork = 'small'\n")
    cfg = cli_cfg("--profile", "cpu", "--config", str(path))
    assert (cfg.learner.target_update, cfg.learner.network) == (2500, "small")
    assert cfg.learner.batch_size == 32
    cfg = cli_cfg("--profile", "gpu", "--device", "cpu")
    assert cfg.learner.batch_size == 512 and cfg.learner.double is True


def test_check_shows_the_profile(capsys) -> None:
    assert main(["train", "--profile", "cpu", "--env", "pong", "--check"]) == 0
    out = capsys.readouterr().out
    assert "# profile cpu (--profile cpu): network nature, batch-size 32" in out
    assert 'profile = "cpu"' in out and 'network = "nature"' in out


def test_bad_profile_is_refused(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--profile", "tpu", "--check"])
    assert exc.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_cpu_profile_threads_follow_the_actors_given_and_leave_clusters_alone() -> None:
    cfg = Config()
    cfg.actor.actors = 3
    profile.apply(cfg, "cpu", explicit={"actors"}, cpus=8)
    assert (cfg.actor.actors, cfg.learner.torch_threads) == (3, 4)
    cfg = Config()
    cfg.run.ray_address = "auto"  # actors on other nodes: no split of this machine
    applied = profile.apply(cfg, "cpu", explicit={"ray_address"}, cpus=8)
    assert cfg.learner.torch_threads == 0 and cfg.actor.actors == Config().actor.actors
    assert {"actors", "torch_threads"}.isdisjoint(c.name for c in applied)
    assert cfg.learner.network == "nature" and cfg.learner.batch_size == 32
