"""TrainConfig: --help text, flag parsing, --config files, validation and dict round trip."""

import dataclasses
import json
import math
import re

import pytest

from jumprelu_ext.train.config import ConfigError, TrainConfig, build_parser, load_config_file, parse_args

FIELDS = dataclasses.fields(TrainConfig)
ACTS = ["--activations", "acts.npy"]  # a data source, so parse_args' validation passes


def _raises_naming(*names):
    """pytest.raises(ConfigError) whose message contains every one of ``names``."""
    pattern = "".join(f"(?=.*{re.escape(str(n))})" for n in names)
    return pytest.raises(ConfigError, match=pattern)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- --help


def test_help_lists_every_field_with_its_help_and_default(help_entries):
    entries = help_entries(build_parser())
    for f in FIELDS:
        flag = TrainConfig.flag(f.name)
        assert flag in entries, f"{flag} missing from --help"
        assert f"{f.metadata['help']} (default: {f.default})" in entries[flag]
    assert "(default: None)" in entries["--config"]
    assert "--no-resume" in entries["--resume"]


# ---------------------------------------------------------------------------- flag parsing


def test_defaults_match_the_dataclass():
    assert parse_args(ACTS) == TrainConfig(activations="acts.npy")


def test_flags_parse_to_field_types():
    cfg = parse_args(
        [
            "--model",
            "gpt2",
            "--dataset",
            "text.txt",
            "--layer",
            "6",
            "--context-length",
            "64",
            "--d-sae",
            "1024",
            "--steps",
            "50",
            "--batch-size",
            "32",
            "--lr",
            "1e-4",
            "--lr-decay",
            "cosine",
            "--l0-coefficient",
            "2",
            "--bandwidth",
            "0.05",
            "--threshold-param",
            "raw",
            "--threshold-lr",
            "0.01",
            "--sparsity-loss",
            "tanh",
            "--device",
            "cuda:1",
            "--dtype",
            "bfloat16",
            "--seed",
            "7",
            "--out",
            "runs/x",
            "--resume",
            "--no-tensorboard",
            "--eval-fraction",
            "0.1",
            "--wandb",
            "proj",
        ]
    )
    expected = {
        "model": "gpt2",
        "dataset": "text.txt",
        "layer": 6,
        "context_length": 64,
        "d_sae": 1024,
        "steps": 50,
        "batch_size": 32,
        "lr": 1e-4,
        "lr_decay": "cosine",
        "l0_coefficient": 2.0,
        "bandwidth": 0.05,
        "threshold_param": "raw",
        "threshold_lr": 0.01,
        "sparsity_loss": "tanh",
        "device": "cuda:1",
        "dtype": "bfloat16",
        "seed": 7,
        "out": "runs/x",
        "resume": True,
        "tensorboard": False,
        "eval_fraction": 0.1,
        "wandb": "proj",
        "activations": None,
    }
    for name, value in expected.items():
        got = getattr(cfg, name)
        assert got == value and type(got) is type(value), (name, got)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--steps", "many"], "--steps"),
        (["--steps", "1.5"], "--steps"),
        (["--lr", "fast"], "--lr"),
        (["--lr-decay", "linear"], "--lr-decay"),
        (["--dtype", "float16"], "--dtype"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_flag_values_are_argparse_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(ACTS + argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_parse_args_validates_unless_told_not_to():
    with _raises_naming("--steps"):
        parse_args(ACTS + ["--steps", "0"])
    assert parse_args(ACTS + ["--steps", "0"], validate=False).steps == 0


# ---------------------------------------------------------------------------- --config files


JSON_CONFIG = json.dumps({"steps": 200, "lr": 1e-3, "lr-decay": "cosine", "resume": True, "activations": "a.npy"})
YAML_CONFIG = "steps: 200\nlr: 1e-3\nlr-decay: cosine\nresume: yes\nactivations: a.npy\n"  # "1e-3" is a YAML string


@pytest.mark.parametrize("name, text", [("c.json", JSON_CONFIG), ("c.yaml", YAML_CONFIG), ("c.yml", YAML_CONFIG)])
def test_config_file_sets_values_and_flags_override(tmp_path, name, text):
    path = _write(tmp_path, name, text)
    assert load_config_file(path) == {
        "steps": 200,
        "lr": 1e-3,
        "lr_decay": "cosine",
        "resume": True,
        "activations": "a.npy",
    }

    cfg = parse_args(["--config", str(path)])
    assert (cfg.steps, cfg.lr, cfg.lr_decay, cfg.resume, cfg.activations) == (200, 1e-3, "cosine", True, "a.npy")
    assert cfg.batch_size == TrainConfig.batch_size  # untouched fields keep their defaults

    # explicit flags win, on either side of --config, even when they restate a default
    cfg = parse_args(["--steps", "5", f"--config={path}", "--lr-decay", "none", "--no-resume"])
    assert (cfg.steps, cfg.lr, cfg.lr_decay, cfg.resume) == (5, 1e-3, "none", False)


def test_empty_config_file_is_no_values(tmp_path):
    assert load_config_file(_write(tmp_path, "c.json", "")) == {}
    assert load_config_file(_write(tmp_path, "c.yaml", "")) == {}


def test_config_file_values_are_validated(tmp_path):
    path = _write(tmp_path, "c.json", json.dumps({"activations": "a.npy", "eval_fraction": 1.5}))
    with _raises_naming("--eval-fraction"):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize(
    "name, text, names",
    [
        ("c.json", '{"stepz": 3}', ["stepz"]),
        ("c.yaml", "l0_coeff: 1\n", ["l0_coeff"]),
        ("c.json", '{"steps": "many"}', ["steps", "--steps"]),
        ("c.json", '{"steps": 1.5}', ["steps", "--steps"]),
        ("c.json", '{"steps": true}', ["steps", "--steps"]),
        ("c.json", '{"steps": null}', ["steps", "--steps"]),
        ("c.json", '{"lr": "fast"}', ["lr", "--lr"]),
        ("c.json", '{"resume": 3}', ["resume", "--resume"]),
        ("c.yaml", "out: [a, b]\n", ["out", "--out"]),
        ("c.json", "[1, 2]", ["mapping"]),
        ("c.json", '{"steps": 3', ["cannot parse"]),
        ("c.yaml", "steps: [1\n", ["cannot parse"]),
        ("c.toml", "steps = 3\n", ["unsupported", ".toml"]),
        ("c", "{}", ["unsupported"]),
    ],
)
def test_bad_config_files_raise_config_error(tmp_path, name, text, names):
    path = _write(tmp_path, name, text)
    with _raises_naming(str(path), *names):
        load_config_file(path)
    with _raises_naming(str(path), *names):
        parse_args(["--config", str(path)])


def test_missing_config_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with _raises_naming("--config", str(path)):
        parse_args(["--config", str(path)])


# ---------------------------------------------------------------------------- validate()

_VALID = TrainConfig(activations="acts.npy")


@pytest.mark.parametrize(
    "name, value",
    [
        ("steps", 0),
        ("steps", -1),
        ("batch_size", 0),
        ("batch_size", -8),
        ("expansion_factor", 0),
        ("context_length", 0),
        ("log_every", 0),
        ("d_sae", 0),
        ("lr_warmup_steps", -1),
        ("sparsity_warmup_steps", -1),
        ("checkpoint_every", -1),
        ("lr", 0.0),
        ("lr", -1e-4),
        ("lr", math.nan),
        ("lr", math.inf),
        ("threshold_lr", 0.0),
        ("threshold_lr", math.nan),
        ("l0_coefficient", -1.0),
        ("l0_coefficient", math.nan),
        ("pre_act_loss_coefficient", -0.1),
        ("bandwidth", 0.0),
        ("bandwidth", -1e-3),
        ("bandwidth", math.nan),
        ("init_threshold", 0.0),
        ("eval_fraction", -0.1),
        ("eval_fraction", 1.0),
        ("eval_fraction", 1.5),
        ("eval_fraction", math.nan),
        ("lr_decay", "linear"),
        ("threshold_param", "exp"),
        ("sparsity_loss", "l1"),
        ("dtype", "float16"),
        ("device", "gpu"),
        ("device", "cuda:"),
        ("device", "cuda:x"),
        ("device", "CPU"),
        ("device", ""),
    ],
)
def test_validate_rejects_bad_value_naming_the_flag(name, value):
    with _raises_naming(TrainConfig.flag(name)):
        dataclasses.replace(_VALID, **{name: value}).validate()


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_validate_accepts_device(device):
    cfg = dataclasses.replace(_VALID, device=device)
    assert cfg.validate() is cfg


def test_validate_accepts_edge_values():
    dataclasses.replace(
        _VALID,
        lr_warmup_steps=0,
        sparsity_warmup_steps=0,
        checkpoint_every=0,
        l0_coefficient=0.0,
        eval_fraction=1e-6,
        d_sae=1,
    ).validate()


def test_validate_data_sources():
    with _raises_naming("--activations", "--model"):
        TrainConfig(activations="a.npy", model="gpt2", dataset="t.txt", layer=0).validate()
    with _raises_naming("--dataset"):
        TrainConfig(model="gpt2", layer=0).validate()
    with _raises_naming("--layer"):
        TrainConfig(model="gpt2", dataset="t.txt").validate()
    TrainConfig(model="gpt2", dataset="t.txt", layer=0).validate()


# ---------------------------------------------------------------------------- to_dict / from_dict


def test_dict_round_trip_through_json():
    cfg = TrainConfig(
        model="gpt2", dataset="t.txt", layer=3, d_sae=64, lr=3e-4, lr_decay="cosine", resume=True, wandb="p"
    )
    data = json.loads(json.dumps(cfg.to_dict()))
    assert set(data) == {f.name for f in FIELDS}
    assert TrainConfig.from_dict(data) == cfg


def test_from_dict_coerces_and_rejects_unknown_keys():
    assert TrainConfig.from_dict({"batch-size": 8.0, "lr": "1e-3"}) == TrainConfig(batch_size=8, lr=1e-3)
    with _raises_naming("bogus"):
        TrainConfig.from_dict({"bogus": 1})


def test_no_data_source_selects_the_embedded_default_and_help_shows_the_recipe(capsys):
    from jumprelu_ext.train.config import EMBEDDED_DEFAULT

    cfg = parse_args([])
    assert cfg.model == EMBEDDED_DEFAULT["model"] and cfg.steps == EMBEDDED_DEFAULT["steps"]
    assert parse_args(["--steps", "7"]).steps == 7  # flags override the preset
    assert parse_args(["--activations", "x.npy"]).steps == TrainConfig().steps  # a source: the recipe
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {TrainConfig().steps})" in help_text and "embedded default" in help_text


# ---------------------------------------------------------------------------- where defaults come from


def test_defaults_for_layers_the_recipe_the_preset_and_the_paper():
    from jumprelu_ext.train.config import EMBEDDED_DEFAULT, PAPER_RECIPE, defaults_for

    recipe = {f.name: f.default for f in FIELDS}
    assert defaults_for(data_source=True) == recipe
    assert defaults_for(data_source=False) == recipe | EMBEDDED_DEFAULT
    assert defaults_for(data_source=False, for_help=True) == recipe  # --help shows the recipe
    assert defaults_for(data_source=True, recipe="paper") == recipe | PAPER_RECIPE
    assert defaults_for(data_source=False, recipe="paper") == recipe | EMBEDDED_DEFAULT | PAPER_RECIPE
    assert defaults_for(data_source=True, recipe="default") == recipe
    # The example of the docstring: one flag, three defaults.
    assert defaults_for(data_source=False)["bandwidth"] == 0.01
    assert defaults_for(data_source=True)["bandwidth"] == 1e-3
    assert defaults_for(data_source=False, recipe="paper")["bandwidth"] == 1e-3


@pytest.mark.parametrize(
    "argv, chosen",
    [
        ([], {"data_source": False, "recipe": None, "for_help": False}),
        (["--activations", "a.npy"], {"data_source": True, "recipe": None, "for_help": False}),
        (["--model=gpt2", "--recipe", "paper"], {"data_source": True, "recipe": "paper", "for_help": False}),
        (["--recipe", "paper", "-h"], {"data_source": False, "recipe": "paper", "for_help": True}),
        (["--eval-activations", "e.npy"], {"data_source": False, "recipe": None, "for_help": False}),
    ],
)
def test_parse_args_takes_its_defaults_from_defaults_for(argv, chosen, monkeypatch):
    from jumprelu_ext.train import config

    seen = []
    real = config.defaults_for
    monkeypatch.setattr(config, "defaults_for", lambda **kw: seen.append(kw) or real(**kw))
    try:
        config.parse_args(argv, validate=False)
    except SystemExit:  # --help
        pass
    assert seen == [chosen]


def test_the_config_file_counts_as_a_data_source_and_a_recipe(tmp_path):
    path = _write(tmp_path, "c.json", '{"model": "gpt2", "dataset": "t.txt", "layer": 1, "recipe": "paper"}')
    cfg = parse_args(["--config", str(path)])
    assert cfg.model == "gpt2" and cfg.steps == TrainConfig().steps and cfg.bandwidth == 1e-3
    assert cfg.lr == 7e-5 and cfg.max_grad_norm == 0.0  # the paper's
    assert parse_args(["--config", str(path), "--recipe", "default"]).max_grad_norm == TrainConfig().max_grad_norm


def test_a_target_l0_the_sae_cannot_reach_is_refused():
    for target in ("32", "40", "20,40"):  # a sweep's every value is checked
        with _raises_naming("--target-l0"):
            parse_args([*ACTS, "--d-sae", "32", "--target-l0", target])
    assert parse_args([*ACTS, "--d-sae", "32", "--target-l0", "31"]).target_l0 == 31


@pytest.mark.parametrize("value", ["-1e-3", "-7E-5", "-inf", "-1e-3,2e-3"])
def test_a_negative_number_reaches_the_options_own_check(value):
    """argparse reads "-1e-3" as a flag ("expected one argument"); it is the value, and the value
    must be positive."""
    flag = "--l0-coefficient" if "," in value else "--lr"
    with pytest.raises(ConfigError, match=f"^{flag} must be"):
        parse_args([*ACTS, flag, value])
    assert parse_args([*ACTS, "--lr", "-1e-3"], validate=False).lr == -1e-3
    assert parse_args([*ACTS, "--lr=3e-4", "--steps", "-5"], validate=False).steps == -5


def test_flags_are_never_abbreviated(capsys):
    """No prefix is read as a flag; in particular --step (the sparse or dense step) is not --steps."""
    for argv in (["--bandwidth", "0.1", "--lr-warm", "5"], ["--mod", "gpt2"], ["--steps", "7", "--ste", "x"]):
        with pytest.raises(SystemExit):
            parse_args([*ACTS, *argv])
        assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([*ACTS, "--step", "10"])
    assert "argument --step: invalid choice: '10'" in capsys.readouterr().err
    cfg = parse_args([*ACTS, "--step", "sparse", "--steps", "7"])
    assert (cfg.step, cfg.steps) == ("sparse", 7)
