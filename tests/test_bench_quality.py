"""The SAE-quality benchmark's own logic (benchmarks/bench_quality.py, benchmarks/quality_data.py):
the best-SAELens envelope and the ratios to it on hand-made runs, the SAELens configurations'
labels and run folders (matched keeps the ones cached runs have), and the docstring texts of the
data presets, on a small tree of .py files. What needs sae_lens is skipped without it."""

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_quality as bq  # noqa: E402
import quality_data as qd  # noqa: E402

from jumprelu_ext.train.data.text import iter_texts  # noqa: E402


def run(label, l0, fvu, dead=0.0, steps=3000, lam=0.001):
    return {
        "label": label,
        "steps": steps,
        "lambda": lam,
        "l0": l0,
        "fvu": fvu,
        "dead_fraction": dead,
        "train_tokens_per_s": 1000.0,
    }


def log_interp(l0, a, b):
    """FVU at l0 on the segment a = (l0, fvu) .. b, linear in log L0 (what the report does)."""
    t = math.log(l0 / a[0]) / math.log(b[0] / a[0])
    return a[1] + t * (b[1] - a[1])


# Matched SAELens is better at high L0, β1 0.9 at lr 1e-3 at low L0: the segments cross near L0 40.
MATCHED = [(10, 0.20, 0.04), (100, 0.05, 0.002)]
B09 = [(10, 0.18, 0.01), (100, 0.07, 0.0)]
OURS = [(10, 0.15, 0.001), (100, 0.04, 0.0)]


@pytest.fixture
def crossing():
    runs = [run("saelens", *p) for p in MATCHED] + [run("saelens-b0.9-lr1e-3", *p) for p in B09]
    runs += [run("default", *p) for p in OURS]
    # Lower still, but not a SAELens frontier (another model), or at other steps: never the best.
    runs += [run("saelens+ste", 10, 0.01), run("saelens+ste", 100, 0.001)]
    runs += [run("saelens-b0.9-lr3e-4", 10, 0.01, steps=10000), run("saelens-b0.9-lr3e-4", 100, 0.001, steps=10000)]
    return runs


def test_best_saelens_takes_the_lower_configuration_at_each_l0(crossing):
    fvu20, label20 = bq.best_saelens(crossing, 3000, 20)
    fvu80, label80 = bq.best_saelens(crossing, 3000, 80)
    assert label20 == "saelens-b0.9-lr1e-3" and fvu20 == pytest.approx(log_interp(20, B09[0][:2], B09[1][:2]))
    assert label80 == "saelens" and fvu80 == pytest.approx(log_interp(80, MATCHED[0][:2], MATCHED[1][:2]))
    assert fvu20 < log_interp(20, MATCHED[0][:2], MATCHED[1][:2])  # the other one really is worse there
    assert fvu80 < log_interp(80, B09[0][:2], B09[1][:2])


def test_an_l0_no_saelens_frontier_brackets_has_no_best_and_no_ratio(crossing):
    assert bq.best_saelens(crossing, 3000, 120) is None
    assert bq.best_saelens(crossing, 1000, 20) is None  # no SAELens run at 1,000 steps
    assert bq.ratio_to_best_saelens(run("default", 120, 0.03), crossing) is None
    table = bq.best_saelens_table([run("saelens", 30, 0.1), run("saelens", 100, 0.05)])
    assert [b["l0"] for b in table] == [40, 80]  # L0 20 is below the frontier: left out, not extrapolated


def test_ratios_to_matched_and_to_the_best_saelens(crossing):
    single = run("tail", 20, 0.15)
    best20 = log_interp(20, B09[0][:2], B09[1][:2])
    assert bq.ratio_to_best_saelens(single, crossing) == pytest.approx(0.15 / best20)
    assert bq.ratio_to_saelens(single, crossing) == pytest.approx(0.15 / log_interp(20, MATCHED[0][:2], MATCHED[1][:2]))
    assert bq.ratio_to_best_saelens(run("saelens-b0.9-lr1e-3", 20, 0.15), crossing) is None  # SAELens's own
    assert bq.ratio_to_best_saelens(run("saelens+ste", 20, 0.15), crossing) == pytest.approx(0.15 / best20)


def test_report_lines_name_the_winning_configuration_and_its_dead_fraction(crossing):
    best = bq.best_saelens_table(crossing)
    at = {b["l0"]: b for b in best if b["steps"] == 3000}
    assert at[20]["label"] == "saelens-b0.9-lr1e-3" and at[80]["label"] == "saelens"
    # Each the winner's own dead fraction: β1 0.9's at L0 20, matched's at 80.
    assert at[20]["dead_fraction"] == pytest.approx(log_interp(20, (10, 0.01), (100, 0.0)))
    assert at[80]["dead_fraction"] == pytest.approx(log_interp(80, (10, 0.04), (100, 0.002)))
    lines = bq.best_ratio_lines(bq.summarize(crossing), best)
    ours = next(line for line in lines if line.startswith("- 3000 steps, default / best SAELens"))
    ratio20 = log_interp(20, OURS[0][:2], OURS[1][:2]) / at[20]["fvu"]
    assert f"= {ratio20:.3f} (b0.9-lr1e-3) / " in ours
    assert ours.split("/ best SAELens")[1].count("(matched)") == 2  # L0 40 and 80
    dead = "/".join(f"{100 * at[t]['dead_fraction']:.1f}" for t in (20, 40, 80))
    assert ours.endswith(f"; dead % ours 0.1/0.0/0.0 vs {dead}")
    assert not any("saelens+ste / best" in line for line in lines)  # SAELens's, not one of ours


def test_matched_keeps_the_old_label_and_run_folder(tmp_path, monkeypatch):
    args = bq.parse_args(["--work-dir", str(tmp_path), "--steps", "3000", "--lambdas-saelens", "0.0008"])
    assert args.saelens_configs == ["matched"]
    planned = bq.planned_runs(args)
    assert ("saelens", "saelens", "matched", 0.0008) in planned
    # A run cached before the configurations existed is reused, not trained again.
    cached = tmp_path / "default_train_saelens_s3000_l0.0008"
    cached.mkdir()
    (cached / "bench_run.json").write_text(json.dumps(run("saelens", 30, 0.1, lam=0.0008)))

    def retrain(*_):
        raise AssertionError("trained again instead of reusing the cached run")

    monkeypatch.setattr(bq, "run_saelens", retrain)
    train = Path(args.cache_dir) / "default_train.npy"
    assert bq.data_files(args)[0] == train
    assert bq.run_or_reuse(args, train, None, 3000, planned[-1])["fvu"] == 0.1


def test_each_configuration_has_its_label_and_its_own_lambdas():
    args = bq.parse_args(
        ["--saelens-configs", "matched", "b0.9-lr3e-4", "b0.9-lr1e-3", "--lambdas-saelens", "0.001", "0.002"]
        + ["--lambdas-saelens-config", "b0.9-lr3e-4=0.0004,0.0009", "--systems", "saelens"]
    )
    assert bq.planned_runs(args) == [
        ("saelens", "saelens", "matched", 0.001),
        ("saelens", "saelens", "matched", 0.002),
        ("saelens", "saelens-b0.9-lr3e-4", "b0.9-lr3e-4", 0.0004),
        ("saelens", "saelens-b0.9-lr3e-4", "b0.9-lr3e-4", 0.0009),
        ("saelens", "saelens-b0.9-lr1e-3", "b0.9-lr1e-3", 0.001),
        ("saelens", "saelens-b0.9-lr1e-3", "b0.9-lr1e-3", 0.002),
    ]
    ste = bq.parse_args(["--saelens-configs", "matched", "b0.9-lr3e-4", "--saelens-ste-to-input"])
    assert [r[1] for r in bq.planned_runs(ste) if r[0] == "saelens"][::4] == ["saelens+ste", "saelens+ste-b0.9-lr3e-4"]
    assert [bq.saelens_config_of(x) for x in ("saelens", "saelens-b0.9-lr3e-4", "saelens+ste", "default")] == [
        "matched",
        "b0.9-lr3e-4",
        None,
        None,
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "wiki"], "unknown --data 'wiki'; known: default, stdlib-l5, packages-l1"),
        (["--lambdas-saelens-config", "b0.9=0.001"], "unknown SAELens configuration 'b0.9'"),
        (["--lambdas-saelens-config", "b0.9-lr3e-4=0.001"], "names b0.9-lr3e-4, which --saelens-configs does not run"),
        (["--data", "stdlib-l5", "--activations", "x.npy"], "--data and --activations are alternatives"),
    ],
)
def test_bad_arguments_say_what_is_wrong(argv, message, capsys):
    with pytest.raises(SystemExit):
        bq.parse_args(argv)
    assert message in capsys.readouterr().err


def test_presets_name_their_own_files(tmp_path):
    args = bq.parse_args(["--data", "stdlib-l5", "--cache-dir", str(tmp_path)])
    assert bq.data_files(args) == (tmp_path / "stdlib-l5_train.npy", tmp_path / "stdlib-l5_heldout.npy")
    layers = {name: p.layer for name, p in qd.PRESETS.items()}
    assert layers == {"default": 3, "stdlib-l5": 5, "packages-l1": 1}


def test_curve_looks_tell_saelens_configurations_apart():
    labels = ["default", "saelens", "saelens-b0.9-lr1e-3", "saelens-b0.9-lr3e-4", "tail"]
    looks = bq.curve_looks(labels, {"default"})
    peers = [(looks[x]["color"], looks[x]["linestyle"], looks[x]["marker"]) for x in labels[1:4]]
    assert len({p[0] for p in peers}) == len({p[1] for p in peers}) == 3
    assert all(c == "black" or c.replace(".", "").isdigit() for c, _, _ in peers)  # black or grey
    assert looks["default"]["lw"] > looks["tail"]["lw"]  # the frontier compared stands out


# ------------------------------------------------------------------------------------- docstring texts

MODULE = '''"""The module's own docstring, long enough to be kept.

Its second paragraph stays in the same document."""


class Early:
    """The class's docstring, long enough as well."""

    def method(self):
        """A method's docstring, also long enough to keep."""


def late():
    """A function defined after the class, so it comes after its method in source order."""


def short():
    """Too short."""
'''


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "lib"
    # Written out of order, so that a walk in the file system's order would differ.
    for name in ("delta", "alpha", "charlie", "bravo"):
        (root / name).mkdir(parents=True)
        (root / name / "m.py").write_text(f'"""The module of the folder {name}, after the files above it."""\n')
    (root / "tests").mkdir()
    (root / "tests" / "t.py").write_text('"""A test module that the walk does not enter at all."""\n')
    (root / "c.py").write_bytes(
        '"""Latin-1 text: caf\xe9 is not UTF-8, so this file is left out."""\n'.encode("latin-1")
    )
    (root / "b.py").write_text('"""Not Python at all, this file does not parse and is skipped."""\ndef (:\n')
    (root / "a.py").write_text(MODULE)
    (root / "dup.py").write_text('"""A method\'s docstring, also long enough to keep."""\n')  # a.py has it
    return root


EXPECTED = [
    "The module's own docstring, long enough to be kept.\n\nIts second paragraph stays in the same document.",
    "The class's docstring, long enough as well.",
    "A method's docstring, also long enough to keep.",
    "A function defined after the class, so it comes after its method in source order.",
] + [f"The module of the folder {name}, after the files above it." for name in ("alpha", "bravo", "charlie", "delta")]


def test_docstrings_in_sorted_walk_and_source_order_each_once(tree):
    assert list(qd.docstrings([tree])) == EXPECTED
    assert [p.name for p in qd.python_files(tree)] == ["a.py", "b.py", "c.py", "dup.py"] + ["m.py"] * 4


def test_the_text_file_reads_back_as_the_same_documents(tree, tmp_path):
    path = tmp_path / "text.jsonl"
    qd.write_text(qd.docstrings([tree]), path)
    assert list(iter_texts(str(path))) == EXPECTED  # the blank line inside the first stays inside it
    record = qd.text_record(path.open("rb"))
    assert record == {"documents": len(EXPECTED), "text_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    qd.write_text(qd.docstrings([tree]), tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()


def test_harvest_dataset_builds_the_text_once(tmp_path, monkeypatch):
    calls = []
    fake = qd.Preset(5, "a text", lambda: calls.append(1) or iter(["one document of text"]), ("python",))
    monkeypatch.setitem(qd.PRESETS, "fake", fake)
    assert qd.harvest_dataset("fake", tmp_path) == str(tmp_path / "fake.jsonl")
    assert qd.harvest_dataset("fake", tmp_path) == str(tmp_path / "fake.jsonl")
    assert calls == [1]
    assert qd.record("fake", tmp_path)["documents"] == 1
    assert qd.harvest_dataset("default", tmp_path) == "pydoc-topics"


# ------------------------------------------------------------------------------------- with sae_lens


@pytest.mark.slow
def test_report_only_reports_one_data_set(tmp_path, crossing):
    pytest.importorskip("sae_lens")
    for data, runs in (("stdlib-l5_train", crossing), ("default_train", [run("saelens", 50, 0.5)])):
        for r in runs:
            folder = tmp_path / "runs" / f"{data}_{r['label']}_s{r['steps']}_l{r['l0']}"
            folder.mkdir(parents=True)
            (folder / "bench_run.json").write_text(json.dumps({**r, "heldout_rows": 8192}))
    prefix = tmp_path / "report"
    argv = ["--report-only", "--data", "stdlib-l5", "--work-dir", str(tmp_path / "runs"), "--out-prefix", str(prefix)]
    assert bq.main(argv + ["--cache-dir", str(tmp_path / "cache")]) == 0
    report = json.loads(Path(f"{prefix}.json").read_text())
    assert len(report["runs"]) == len(crossing)  # not the default data's run
    assert report["env"]["data_preset"] == {"preset": "stdlib-l5", "layer": 5, "versions": qd.versions(["python"])}
    md = Path(f"{prefix}.md").read_text()
    assert "- 3000 steps, default / best SAELens: FVU ratio at L0 20/40/80 = " in md
    assert Path(f"{prefix}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_configuration_reaches_saelens_optimizer(tmp_path, monkeypatch):
    pytest.importorskip("sae_lens")
    import numpy as np
    from sae_lens.training import sae_trainer

    seen = []

    class Spy(sae_trainer.SAETrainer):
        def fit(self):
            out = super().fit()
            seen.append(self.optimizer.param_groups[0])
            return out

    monkeypatch.setattr(sae_trainer, "SAETrainer", Spy)
    train = tmp_path / "train.npy"
    np.save(train, np.random.default_rng(0).standard_normal((2048, 8)).astype(np.float32))
    args = bq.parse_args(["--d-sae", "16", "--batch-size", "64", "--lr-warmup-steps", "1", "--threads", "1"])
    bq.run_saelens(args, train, 3, 0.001, tmp_path / "sae", "b0.9-lr3e-4")
    assert seen[0]["betas"] == (0.9, 0.999) and seen[0]["lr"] == pytest.approx(3e-4)


@pytest.mark.parametrize(
    ("config", "decay"), [("matched", "none"), ("matched-tail", "tail"), ("b0.9-lr1e-3-tail", "tail")]
)
def test_saelens_lr_follows_our_schedule_with_the_configurations_decay(config, decay):
    """SAELens's own scheduler, built from the configuration, gives our lr_factor at every step:
    the "-tail" configurations decay over exactly our recipe's tail, the others stay constant."""
    pytest.importorskip("sae_lens")
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from jumprelu_ext.train.schedules import lr_factor

    steps = 50
    args = bq.parse_args(["--lr-warmup-steps", "5", "--batch-size", "4"])
    cfg = bq.saelens_trainer_config(args, steps, config)
    assert cfg.adam_beta1 == bq.SAELENS_CONFIGS[config]["adam_beta1"]
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=4, d_sae=8, device="cpu"))
    trainer = SAETrainer(cfg, sae, iter(()))
    seen = []
    for _ in range(steps):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    expected = [cfg.lr * lr_factor(step, args.lr_warmup_steps, steps, decay) for step in range(steps)]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert (seen[-1] < 0.5 * cfg.lr) == (decay == "tail")  # the last step is in the tail
