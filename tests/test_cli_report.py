"""What the trainer reports (issue 13, items 4, 6 and 8): data problems stated (NaN/Inf rows
dropped, a batch larger than the data, all-NaN data named), the printed summary aligned, and
plots a researcher can read."""

import json

import numpy as np
import pytest
from test_train import small_run_flags

from jumprelu_ext.train import loop
from jumprelu_ext.train.data.activations import split_holdout
from jumprelu_ext.train.errors import run_cli
from jumprelu_ext.train.report import plots

D_IN = 16


def flags(activations, out, *extra):
    """test_train's small run, shortened to 4 steps."""
    return small_run_flags(activations, out, "--steps", "4", "--sparsity-warmup-steps", "2", *extra)


def rows(n=1000, seed=0):
    return np.random.default_rng(seed).normal(size=(n, D_IN)).astype(np.float32) * 3.0 + 1.0


def cli(argv, capsys):
    capsys.readouterr()
    status = run_cli(loop.main, argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def train_on_rows(tmp_path, capsys, *extra):
    """The 4-step run on 1,000 random rows, in tmp_path/run: (status, stdout, stderr)."""
    path = tmp_path / "acts.npy"
    np.save(path, rows())
    return cli(flags(path, tmp_path / "run", *extra), capsys)


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ item 6: data problems stated


@pytest.mark.slow
def test_dropped_rows_are_in_the_summary_and_eval_json(tmp_path, capsys):
    x = rows()
    bad = np.arange(0, 1000, 10)  # 100 rows: NaN in some, Inf in others
    x[bad[::2], 3] = np.nan
    x[bad[1::2], 5] = np.inf
    path = tmp_path / "acts.npy"
    np.save(path, x)
    status, out, err = cli(flags(path, tmp_path / "run", "--steps", "20"), capsys)
    assert status == 0, err

    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    _, held_out = split_holdout(1000, 0.05, 0)
    expected_held_out = int(np.isin(held_out, bad).sum())
    assert expected_held_out > 0
    assert results["held_out_dropped_rows"] == expected_held_out
    assert results["tokens"] == held_out.size - expected_held_out
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert results["dropped_rows"] == metrics[-1]["dropped_rows"] > 0
    summary = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("  ")}
    assert summary["dropped_rows"] == str(results["dropped_rows"])
    assert summary["held_out_dropped_rows"] == str(expected_held_out)


@pytest.mark.slow
def test_clean_data_reports_zero_dropped_rows(tmp_path, capsys):
    path = tmp_path / "acts.npy"
    np.save(path, rows())
    status, out, err = cli(flags(path, tmp_path / "run"), capsys)
    assert status == 0, err
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert results["dropped_rows"] == 0 and results["held_out_dropped_rows"] == 0
    assert "dropped_rows" not in out  # the summary names them only when there are some


def test_a_batch_larger_than_the_training_rows_is_an_error(tmp_path, capsys):
    path = tmp_path / "acts.npy"
    np.save(path, rows())  # 950 training rows after the 5% held out
    status, _, err = cli(flags(path, tmp_path / "run", "--batch-size", "2000"), capsys)
    assert status == 2
    line = one_error_line(err)
    assert "--batch-size 2000" in line and "950" in line and "acts.npy" in line
    assert not (tmp_path / "run").exists()


def test_all_nan_data_names_the_file(tmp_path, capsys):
    path = tmp_path / "all_nan.npy"
    np.save(path, np.full((100, D_IN), np.nan, dtype=np.float32))
    status, _, err = cli(flags(path, tmp_path / "run", "--batch-size", "8"), capsys)
    assert status == 2
    line = one_error_line(err)
    assert "all_nan.npy" in line and "NaN" in line


def test_all_nan_held_out_rows_name_the_file(tmp_path, capsys):
    path, held_out = tmp_path / "acts.npy", tmp_path / "held_out_nan.npy"
    np.save(path, rows())
    np.save(held_out, np.full((50, D_IN), np.inf, dtype=np.float32))
    status, _, err = cli(flags(path, tmp_path / "run", "--eval-activations", str(held_out)), capsys)
    assert status == 2
    line = one_error_line(err)
    assert "held_out_nan.npy" in line and "NaN/Inf" in line


# ------------------------------------------------------------------ item 8: the summary lines up


@pytest.mark.slow
def test_a_warmup_longer_than_the_run_is_a_warning(tmp_path, capsys):
    status, _, err = train_on_rows(tmp_path, capsys, "--sparsity-warmup-steps", "100")
    assert status == 0, err
    assert "warning: --sparsity-warmup-steps 100 is longer than the run (--steps 4)" in err


@pytest.mark.slow
def test_an_sae_that_is_not_sparse_is_a_warning(tmp_path, capsys):
    """No sparsity penalty: the run succeeds, but its SAE is no use, and the report says so."""
    status, out, err = train_on_rows(tmp_path, capsys, "--l0-coefficient", "0")
    assert status == 0, err
    l0 = json.loads((tmp_path / "run" / "eval.json").read_text())["l0"]
    assert l0 > 0.1 * 32
    (warning,) = [line for line in err.splitlines() if "not sparse" in line]
    assert warning.startswith(f"warning: the SAE is not sparse: held-out L0 {l0:.0f} of its 32 features")
    assert "--l0-coefficient" in warning and "--lr" in warning


def test_summary_columns_line_up():
    results = {
        "tokens": 6426,
        "l0": 23.76,
        "fvu": 0.2959,
        "mse": 0.2428,
        "dead_fraction": 0.01042,
        "dense_fraction": 0.004232,
        "dropped_rows": 12,
        "held_out_dropped_rows": 3,
        "downstream": {"kind": "encoder", "cosine_similarity": 0.9019, "token_cosine_similarity": 0.8616},
    }
    lines = [line for line in loop.summary(results, "runs/x").splitlines() if line.startswith("  ")]
    names = [line.split()[0] for line in lines]
    assert names == [
        "l0",
        "fvu",
        "mse",
        "dead_fraction",
        "dense_fraction",
        "dropped_rows",
        "held_out_dropped_rows",
        "downstream.kind",
        "downstream.cosine_similarity",
        "downstream.token_cosine_similarity",
    ]
    value_columns = {line.index(line.split()[1], len("  ") + len(line.split()[0])) for line in lines}
    assert len(value_columns) == 1, "\n".join(lines)


# ------------------------------------------------------------------ item 4: plots


def _captured_figures(monkeypatch):
    figures = []

    def keep(fig, path):
        figures.append(fig)

    monkeypatch.setattr(plots, "_save_png", keep)
    return figures


def _log_rows(steps=100, target=False):
    out = []
    for step in range(5, steps + 1, 5):
        settle = np.exp(-step / 10)
        out.append(
            {
                "step": step,
                "tokens": step * 4096,
                "loss": 0.3 + 5.0 * settle,
                "mse": 0.25 + 4.0 * settle,
                "l0": 24 + 750 * settle,
                "fvu": 0.3 + 10 * settle,
                "l0_coefficient": 4e-3 * (1 + 0.1 * np.sin(step)) if target else 4e-3 * min(1, step / 20),
                "lr": 7e-4 * min(1, step / 10),
                "grad_norm": 0.2 + 30 * settle,
                "threshold_mean": 0.02 + 0.2 * (1 - settle),
                "dead_fraction": 0.01,
                "dense_fraction": 0.004 + 0.5 * settle,
                "dropped_rows": 0,
            }
        )
    return out


def _case_rows(case, steps=200):
    """The logged rows of the runs a plot must not misrepresent (issue 24, item 3)."""
    rows = _log_rows(steps)
    for row in rows:
        late = row["step"] / steps
        if case == "fully dense":  # every feature fires on most tokens; L0 creeps from 1,400 to 1,560
            row.update(l0=1400 + 160 * late**2, dense_fraction=1.0, dead_fraction=0.0, threshold_mean=1e-3)
            row.update(loss=2.8 + 28 * late, fvu=0.2 - 0.15 * late)
        elif case == "no dead features":
            row["dead_fraction"] = 0.0
        elif case == "L0 barely moves":
            row["l0"] = 40 + 0.5 * np.sin(row["step"])
    return rows


CURVE_CASES = ["healthy", "fully dense", "no dead features", "L0 barely moves"]


def _tick_labels(axis, low, high):
    """The non-empty tick labels that a drawn axis shows between ``low`` and ``high``."""
    ticks = axis.get_major_ticks() + axis.get_minor_ticks()
    return [
        t.label1.get_text()
        for t in ticks
        if t.label1.get_visible() and t.label1.get_text() and low <= t.get_loc() <= high
    ]


@pytest.mark.parametrize("case", CURVE_CASES)
def test_every_value_is_inside_its_frame_and_every_axis_has_tick_labels(tmp_path, monkeypatch, case):
    figures = _captured_figures(monkeypatch)
    rows = _case_rows(case)
    plots.plot_curves(rows, tmp_path / "curves.png", max_grad_norm=0.1)
    (fig,) = figures
    fig.canvas.draw()
    settled = plots.SETTLED_FROM * rows[-1]["step"]
    for ax in fig.axes:
        title = ax.get_title()
        to_frame = ax.transData + ax.transAxes.inverted()  # data -> 0..1 of the frame
        for line in ax.get_lines():
            if line.get_linestyle() == "None" or line.get_label() not in {
                label for _, _, keys, _ in plots.PANELS for _, label in keys
            }:
                continue  # the open markers of points beyond the range, and the marked levels
            points = [(x, y) for x, y in zip(line.get_xdata(), line.get_ydata()) if x >= settled]
            heights = to_frame.transform(points)[:, 1]
            assert (heights > 0.02).all() and (heights < 0.98).all(), (
                f"{case}: {title}: {line.get_label()} on the frame"
            )
        low, high = ax.get_ylim()
        assert len(_tick_labels(ax.yaxis, low, high)) >= 2, (
            f"{case}: {title}: y ticks {_tick_labels(ax.yaxis, low, high)}"
        )
        assert len(_tick_labels(ax.xaxis, *ax.get_xlim())) >= 2, f"{case}: {title}: x ticks"
        assert ax.get_xlabel() and ax.get_ylabel(), f"{case}: {title}"


def test_curves_show_what_judges_a_run_on_readable_axes(tmp_path, monkeypatch):
    figures = _captured_figures(monkeypatch)
    plots.plot_curves(_log_rows(), tmp_path / "curves.png", max_grad_norm=1.0)
    (fig,) = figures
    axes = {ax.get_title(): ax for ax in fig.axes}
    titles = " | ".join(axes)
    for wanted in ("loss", "L0", "FVU", "θ", "dead", "dense", "gradient norm"):
        assert wanted in titles, titles
    assert not any(title in ("lr", "λ (l0_coefficient)") for title in axes), titles  # fixed schedules left out
    assert not any("λ" in title for title in axes), titles
    loss_axis = next(ax for title, ax in axes.items() if title.startswith("loss"))
    assert {line.get_label() for line in loss_axis.get_lines()} >= {"loss", "MSE"}
    for title, ax in axes.items():
        assert ax.get_ylabel(), f"{title}: no y label"
        assert ax.xaxis.get_gridlines()[0].get_visible(), f"{title}: no grid"
    for prefix in ("loss", "L0", "FVU", "gradient norm"):  # values spanning decades: log axes
        ax = next(ax for title, ax in axes.items() if title.startswith(prefix))
        assert ax.get_yscale() == "log", prefix
    # The first points (warm-up) do not squash the rest: the y range fits the settled run.
    l0_axis = axes["L0"]
    low, high = l0_axis.get_ylim()
    assert high < _log_rows()[0]["l0"], (low, high)  # the first logged point lies above the range
    assert low < 24 < high


def test_curves_show_lambda_and_the_target_with_target_l0(tmp_path, monkeypatch):
    figures = _captured_figures(monkeypatch)
    plots.plot_curves(_log_rows(target=True), tmp_path / "curves.png", target_l0=24)
    axes = {ax.get_title(): ax for ax in figures[0].axes}
    assert any("λ" in title for title in axes), list(axes)
    assert any("target" in line.get_label() for line in axes["L0"].get_lines())


def test_density_names_the_set_and_marks_the_dense_cutoff(tmp_path, monkeypatch):
    figures = _captured_figures(monkeypatch)
    rates = np.concatenate([np.zeros(10), np.logspace(-4, -0.2, 90)])
    plots.plot_density(rates, tmp_path / "density.png", tokens=6426, dense_rate=0.1)
    (ax,) = figures[0].axes
    assert "held-out" in ax.get_title() and "6,426" in ax.get_title()
    dense = int((rates > 0.1).sum())
    assert f"{dense} dense" in ax.get_title()
    vertical_at = {round(float(line.get_xdata()[0]), 6) for line in ax.get_lines()}
    assert -1.0 in vertical_at  # log10(0.1): the dense cut-off


@pytest.mark.slow
@pytest.mark.parametrize("name", ["curves.png", "density.png"])
def test_a_real_run_writes_both_plots(tmp_path, capsys, name):
    path = tmp_path / "acts.npy"
    np.save(path, rows())
    assert cli(flags(path, tmp_path / "run"), capsys)[0] == 0
    assert (tmp_path / "run" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
