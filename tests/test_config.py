"""One config surface: every field of the run config and of the configs it composes is set from
YAML and key=value overrides by one merge rule, and reaches the optimizers and schedules."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math

import pytest

from scalebio_core.core.baselines import DoReMiConfig
from scalebio_core.core.bilevel import BilevelConfig, lr_multiplier
from scalebio_core.core.swarm import SwarmConfig
from scalebio_core.errors import ConfigError
from scalebio_core.train.config import TrainConfig, load_preset, merge, parse_overrides

PRESET_FILE = """
defaults:
  model: embedded:nano
  corpus_args: {n_per_source: 8, n_val: 4}
  alpha_max: 40.0
  betas: [0.8, 0.99]
quick:
  corpus_args: {n_val: 6}
  min_lr_ratio: 0.25
  optimizer: sgd
  momentum: 0.5
"""


def test_composed_fields_are_set_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(PRESET_FILE)
    d = load_preset(path, "quick", ["momentum=0.9", "tau=1.5", "doremi_eta=0.5"])
    # defaults, then the preset's section, then the overrides; mappings merge key by key
    assert d["corpus_args"] == {"n_per_source": 8, "n_val": 6}
    cfg = TrainConfig.from_dict(d)
    b = cfg.bilevel
    assert (b.alpha_max, b.betas, b.min_lr_ratio, b.momentum, b.tau) == (
        40.0,
        (0.8, 0.99),
        0.25,
        0.9,
        1.5,
    )
    assert cfg.doremi.eta == 0.5 and b.total_steps == cfg.steps
    # the flat dict round-trips (config.yaml) and a changed composed field shows in a diff
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(betas=[0.9, 0.95]).bilevel.betas == (0.9, 0.95)
    assert cfg.replace(steps=7).bilevel.total_steps == 7
    assert dataclasses.replace(cfg, steps=9).bilevel.total_steps == 9


def test_every_field_of_every_config_is_one_flat_key():
    cfg = TrainConfig()
    keys = set(cfg.to_dict())
    own = {f.name for f in dataclasses.fields(TrainConfig)} - {"bilevel", "doremi", "swarm"}
    bilevel = {f.name for f in dataclasses.fields(BilevelConfig)} - {"total_steps"}
    doremi = {f"doremi_{f.name}" for f in dataclasses.fields(DoReMiConfig)}
    swarm = {f"swarm_{f.name}" for f in dataclasses.fields(SwarmConfig)}
    assert keys == own | bilevel | doremi | swarm  # each declared once, none copied
    assert not own & bilevel and "steps" in own
    for key in sorted(keys - {"corpus_args", "sources", "validation", "test", "lora_targets"}):
        value = cfg.to_dict()[key]
        assert TrainConfig.from_dict({key: value}).to_dict()[key] == value, key
    with pytest.raises(ConfigError, match=r"unknown config keys \['doremi_etaa'\]"):
        TrainConfig(doremi_etaa=1.0)


@pytest.mark.parametrize("cls", [TrainConfig, BilevelConfig, DoReMiConfig, SwarmConfig])
def test_every_config_field_has_a_docstring(cls):
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    undocumented = [
        node.target.id
        for node, after in zip(body, body[1:] + [None])
        if isinstance(node, ast.AnnAssign)
        and not (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant))
    ]
    assert not undocumented, undocumented


def test_the_fields_reach_the_optimizers_and_schedules():
    import torch

    from scalebio_core.core.bilevel import init_state
    from scalebio_core.core.problem import ParamVector

    w, u = ParamVector(torch.zeros(2)), ParamVector(torch.zeros(2))
    cfg = TrainConfig(betas=[0.8, 0.99], alpha=2.0, tau=2.0, alpha_max=5.0, steps=10).bilevel
    state = init_state(w, u, ["a", "b"], cfg)
    assert state.opt_w.param_groups[0]["betas"] == (0.8, 0.99)
    assert state.opt_lam.param_groups[0]["betas"] == (0.8, 0.99)
    assert [cfg.alpha_at(i) for i in range(4)] == [2.0, 4.0, 5.0, 5.0]  # capped at alpha_max
    sgd = TrainConfig(optimizer="sgd", momentum=0.7).bilevel
    state = init_state(w, u, ["a", "b"], sgd)
    assert state.opt_u.param_groups[0]["momentum"] == 0.7
    floor = TrainConfig(min_lr_ratio=0.25, steps=10, warmup_ratio=0.0).bilevel
    assert lr_multiplier("cosine", 10, floor) == pytest.approx(0.25)


def test_one_precision_vocabulary():
    """Every precision of the package's vocabulary runs in the trainer and has byte counts in
    the memory model (the same meaning everywhere: the CLI and the planner offer these names)."""
    from scalebio_core.plan.memory import PRECISION_BYTES
    from scalebio_core.train.config import PRECISIONS

    assert set(PRECISION_BYTES) == set(PRECISIONS) == {"fp32", "bf16", "bf16-weights"}
    for name in PRECISIONS:
        assert TrainConfig(precision=name).precision == name
    assert PRECISION_BYTES["bf16"] == (4, 2)  # the trainer's bf16: fp32 weights, autocast
    assert PRECISION_BYTES["bf16-weights"] == (2, 2)  # bf16 weights and gradients


def test_merge_rule_and_bad_presets(tmp_path):
    assert merge({"a": {"x": 1, "y": 2}, "b": [1]}, {"a": {"y": 3}, "b": [2]}) == {
        "a": {"x": 1, "y": 3},
        "b": [2],
    }
    assert parse_overrides(["corpus_args.n_val=3", "betas=[0.5, 0.6]"]) == {
        "corpus_args": {"n_val": 3},
        "betas": [0.5, 0.6],
    }
    path = tmp_path / "mine.yaml"
    path.write_text(PRESET_FILE)
    with pytest.raises(ConfigError, match=r"has presets \['quick'\]: pass --preset"):
        load_preset(path)
    with pytest.raises(ConfigError, match=r"no preset 'paper'; known presets: \['quick'\]"):
        load_preset(path, "paper")
    run_config = tmp_path / "config.yaml"
    run_config.write_text("steps: 3\n")
    assert load_preset(run_config) == {"steps": 3}
    with pytest.raises(ConfigError, match="has no preset sections: leave out --preset quick"):
        load_preset(run_config, "quick")
    with pytest.raises(ConfigError, match="does not exist"):
        load_preset(tmp_path / "missing.yaml")
    assert load_preset("noisy", "smoke")["corpus"] == "noisy"  # a name in configs/
    with pytest.raises(ConfigError, match="betas must be two numbers"):
        TrainConfig(betas=[0.9])
    with pytest.raises(ConfigError, match="doremi_ref_steps must be of type int"):
        TrainConfig(doremi_ref_steps=1.5)
    assert math.isinf(TrainConfig().bilevel.alpha_max)


def test_cli_sets_a_composed_field(tmp_path):
    """The command line reaches a field of BilevelConfig (and config.yaml records it)."""
    import subprocess
    import sys

    from scalebio_core.files import load_yaml

    out = tmp_path / "run"
    args = [
        "corpus=noisy",
        'corpus_args={"n_per_source": 8, "n_val": 4, "noise_rates": [0.0, 1.0]}',
        "model=embedded:nano",
        "max_length=80",
        "steps=1",
        "batch_size=4",
        "val_batch_size=2",
        "betas=[0.8, 0.95]",
        "min_lr_ratio=0.5",
        f"out_dir={out}",
    ]
    cmd = [sys.executable, "-m", "scalebio_core", "train", "--no-progress", *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    saved = load_yaml((out / "config.yaml").read_text())
    assert saved["betas"] == [0.8, 0.95] and saved["min_lr_ratio"] == 0.5


@pytest.mark.parametrize(
    "key, value",
    [("lr_lam", 1e300), ("lr_lam", math.inf), ("lr_w", 1e39), ("lr_u", math.nan), ("lr_w", -1)],
)
def test_an_absurd_learning_rate_is_refused_naming_its_field(key, value):
    """Issue 27, item 10: lr_lam=1e300 was a raw overflow RuntimeError in the λ step."""
    with pytest.raises(ConfigError, match=rf"learning rates must be > 0 and at most 1e\+06.*{key}"):
        TrainConfig(**{key: value})
    assert TrainConfig(lr_lam=1e6).bilevel.lr_lam == 1e6  # the largest accepted


def test_an_absurd_learning_rate_on_the_command_line_is_a_clear_error(tmp_path, capsys):
    from scalebio_core.cli import main

    out = tmp_path / "run"
    code = main(["train", "--no-progress", "steps=3", "lr_lam=1e300", f"out_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and "got lr_lam = 1e+300. Set lr_lam to a usual rate" in err, err
    assert not out.exists()  # refused before anything was written


def test_overrides_stand_before_between_and_after_the_options(tmp_path):
    """Issue 27, item 11: `train … steps=3 --resume out_dir=X` failed with "unrecognized
    arguments"; key=value overrides are read wherever they stand, for train, sft and memory."""
    from scalebio_core.cli import _train_config, build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "steps=3", "--resume", f"out_dir={tmp_path}"])
    assert args.resume and args.overrides == ["steps=3", f"out_dir={tmp_path}"]
    assert _train_config(args) == {"steps": 3, "out_dir": str(tmp_path)}
    path = tmp_path / "mine.yaml"
    path.write_text(PRESET_FILE)
    argv = ["train", "--config", str(path), "steps=3", "--no-progress", "lr_w=1e-3", "--preset"]
    args = parser.parse_args([*argv, "quick", "seed=2"])
    assert (args.config, args.preset, args.no_progress) == (str(path), "quick", True)
    d = _train_config(args)
    assert (d["steps"], d["lr_w"], d["seed"], d["optimizer"]) == (3, 1e-3, 2, "sgd")
    args = parser.parse_args(["sft", "steps=2", "--data", "d.jsonl", "seed=1", "--out", "o"])
    assert (args.data, args.out, args.overrides) == ("d.jsonl", "o", ["steps=2", "seed=1"])
    args = parser.parse_args(["memory", "steps=3", "--gpus", "2", "lr_w=1e-3", "--model", "m"])
    assert (args.gpus, args.model, args.overrides) == (2, ["m"], ["steps=3", "lr_w=1e-3"])
    with pytest.raises(SystemExit):  # an unknown option is still refused
        parser.parse_args(["train", "steps=3", "--bogus", "seed=1"])


def test_on_and_off_are_taken_as_yaml_gives_them(tmp_path):
    """Issue 30: `exact_match=on` on the command line was refused (YAML reads on as true)."""
    from scalebio_core.cli import _train_config, build_parser

    for text, value in [("on", "on"), ("yes", "on"), ("true", "on"), ("off", "off"), ("no", "off")]:
        given = parse_overrides([f"exact_match={text}"])
        assert TrainConfig(**given).exact_match == value, text
    assert TrainConfig(**parse_overrides(["exact_match='on'"])).exact_match == "on"
    assert TrainConfig(**parse_overrides(["null_band=off"])).null_band == "off"
    with pytest.raises(ConfigError, match=r"null_band got on, yes or true .* \('auto', 'halves'"):
        TrainConfig(**parse_overrides(["null_band=on"]))
    path = tmp_path / "c.yaml"
    path.write_text("exact_match: on\nnull_band: off\n")
    args = build_parser().parse_args(["train", "--config", str(path), "exact_match=off"])
    assert TrainConfig.from_dict(_train_config(args)).exact_match == "off"
    cfg = TrainConfig.from_dict(load_preset(path))
    assert (cfg.exact_match, cfg.null_band) == ("on", "off")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # config.yaml holds the text


def test_a_run_on_its_own_data_names_no_corpus():
    """Issue 30: a data_dir run's config.yaml claimed `corpus: noisy`, which it never read."""
    assert TrainConfig().corpus == "noisy" and TrainConfig(corpus="math").corpus == "math"
    assert TrainConfig(corpus=None).corpus == "noisy"  # null: the default corpus
    assert TrainConfig(data_dir="d").to_dict()["corpus"] is None
    assert TrainConfig(data_dir="d", corpus="noisy") == TrainConfig(data_dir="d")  # old files
    given = {"sources": [{"name": "a", "path": "a.jsonl"}], "validation": {"path": "v.jsonl"}}
    assert TrainConfig(**given).corpus is None
    assert TrainConfig(data_dir="d").replace(data_dir=None).corpus == "noisy"
    with pytest.raises(ConfigError, match="corpus must be the name of an embedded corpus"):
        TrainConfig(corpus=3)


@pytest.mark.parametrize("command", ["train", "sft"])
def test_help_lists_the_common_keys_and_where_all_are(command, capsys):
    from scalebio_core.cli import COMMON_KEYS, SFT_KEYS, main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    keys = COMMON_KEYS if command == "train" else SFT_KEYS
    want = ["data_dir", "model", "exact_match", "seed", "steps"]
    want += ["out_dir"] if command == "train" else []
    assert set(want) <= set(keys)
    for key, meaning in keys.items():
        assert f"{key} {' '.join(meaning.split())}" in out, key
    assert "docs/config.md" in out and "exact_match=on" in out
