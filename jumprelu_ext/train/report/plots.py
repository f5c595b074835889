"""Training plots: feature-density histogram, training curves and a sweep's L0–FVU frontier.

matplotlib is imported lazily, inside the functions, and only its non-interactive Agg canvas
is used (``Figure`` + ``FigureCanvasAgg``, not pyplot): no display is needed and the global
pyplot backend/state is left untouched. Files are written atomically with
``files.atomic_write`` (temporary file in the destination folder, then ``os.replace``).

``curves.png`` shows what a run is judged by, each against the step: loss and MSE, L0, FVU,
mean θ, the dead and dense fractions of the log window, the gradient norm before clipping, and
λ when ``--target-l0`` steers it (a fixed schedule says nothing about the run). Quantities that
span decades (loss, MSE, L0, FVU, grad norm, and θ or λ when they do) get log axes, and every
panel's y range is fitted to the run after its first 10% of steps, so the warm-up's first
points (loss and L0 far above where they settle) do not squash the rest into a line; points
outside the range are drawn at its edge as open markers. Every value is drawn inside its frame
(a dead fraction of 0% or a dense one of 100% included) and every axis has at least two tick
labels, however little its values move.
"""

import math

from ...files import atomic_write

__all__ = ["plot_density", "plot_curves", "plot_frontier"]

SETTLED_FROM = 0.1  # y ranges are fitted to the steps after this fraction of the run


def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def plot_density(firing_rates, path, bins=50, tokens=None, dense_rate=0.1, set_name="held-out"):
    """Histogram of log10 feature firing rates on the ``set_name`` set of ``tokens`` tokens to
    ``path`` (PNG), with the dense cut-off (``dense_rate``) and the lowest measurable rate (one
    token) marked; never-firing features (log10 0 = -inf) are not binned but counted."""
    import numpy as np

    from .metrics import density_histogram

    hist = density_histogram(firing_rates, bins=bins)
    n = int(hist.counts.sum()) + hist.never_fired
    rates = np.asarray(firing_rates, dtype=np.float64).reshape(-1)
    dense = int((rates > dense_rate).sum())
    fig = _new_figure((7, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    if hist.counts.sum() > 0:
        ax.stairs(hist.counts, hist.edges, fill=True, alpha=0.8, label="features")
    ax.axvline(math.log10(dense_rate), color="tab:red", linestyle="--", label=f"dense: > {dense_rate:.0%} of tokens")
    if tokens:
        ax.axvline(-math.log10(tokens), color="gray", linestyle=":", label="fires on 1 token")
    ax.set_xlabel(f"log10 firing rate (fraction of {set_name} tokens a feature fires on)")
    ax.set_ylabel("features")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    on = f" on {tokens:,} {set_name} tokens" if tokens else f" on the {set_name} set"
    pct = (lambda k: 100.0 * k / n) if n else (lambda k: 0.0)
    ax.set_title(
        f"Feature density{on}\n{n:,} features: {hist.never_fired:,} never fired ({pct(hist.never_fired):.1f}%), "
        f"{dense:,} dense ({pct(dense):.1f}%)",
        fontsize="medium",
    )
    fig.tight_layout()
    _save_png(fig, path)


# (title, y label, [(row key, legend label)], scale: True (log) / False / "auto" (log when the
# values span more than a decade) / "percent" (0-100%, linear below 0.1% and log above, so 0.4%
# and 60% are both readable; not fitted))
PANELS = [
    ("loss and MSE", "per token (scaled input)", [("loss", "loss"), ("mse", "MSE")], True),
    ("L0", "active features per token", [("l0", "L0")], True),
    ("FVU (batch)", "fraction of variance unexplained", [("fvu", "FVU")], True),
    ("mean θ", "threshold (scaled input)", [("threshold_mean", "mean θ")], "auto"),
    (
        "dead and dense features (log window)",
        "% of features",
        [("dead_fraction", "dead: no firing"), ("dense_fraction", "dense: > 10% of tokens")],
        "percent",
    ),
    ("gradient norm (before clipping)", "global L2 norm", [("grad_norm", "grad norm")], True),
]
LAMBDA_PANEL = ("λ (steered to the L0 target)", "λ (--l0-coefficient)", [("l0_coefficient", "λ")], "auto")
PERCENT_KEYS = {"dead_fraction", "dense_fraction"}
# The percent panel's y range: 0% and 100% inside the frame, not on it (symlog: about 4% of the
# height below 0 and above 100).
PERCENT_LIMITS = (-0.03, 160.0)


def _plain(value, _position=None):
    return f"{value:g}"


def _minor(value, _position=None):
    """Minor log ticks labelled at 2, 3 and 5 times a power of ten only, so they do not crowd."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if any(abs(mantissa - m) < 1e-6 for m in (2, 3, 5)) else ""


def _no_label(value, _position=None):
    return ""


def _log_labels_within(low, high):
    """How many ticks a log axis from ``low`` to ``high`` labels: powers of ten, and 2, 3 and 5
    times them (the minor labels, ``_minor``)."""
    count = 0
    for exponent in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        count += sum(low <= m * 10.0**exponent <= high for m in (1, 2, 3, 5))
    return count


def _series(rows, key):
    xs, ys = [], []
    for i, row in enumerate(rows):
        v = row.get(key)
        if v is None or not math.isfinite(float(v)):
            continue
        xs.append(row.get("step", i))
        ys.append(100.0 * float(v) if key in PERCENT_KEYS else float(v))
    return xs, ys


def _y_range(points, log, extra=()):
    """(low, high) fitted to the settled part of the run and the ``extra`` values, padded; None
    to let matplotlib choose."""
    if not points:
        return None
    last = max(x for x, _ in points)
    settled = [y for x, y in points if x >= SETTLED_FROM * last] or [y for _, y in points]
    settled += list(extra)
    if log:
        settled = [y for y in settled if y > 0]
        if not settled:
            return None
        lo, hi = math.log10(min(settled)), math.log10(max(settled))
        pad = max(0.08 * (hi - lo), 0.05)
        return 10 ** (lo - pad), 10 ** (hi + pad)
    lo, hi = min(settled), max(settled)
    pad = max(0.08 * (hi - lo), 0.05 * max(abs(lo), abs(hi)), 1e-3)
    return lo - pad, hi + pad


def _is_log(log, ys):
    if log == "percent":
        return False
    if log == "auto":
        return bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 10
    return log and bool(ys) and min(ys) > 0


def plot_curves(metrics_rows, path, max_grad_norm=None, target_l0=None):
    """The training curves (see the module docstring) against ``step`` to ``path`` (PNG).

    Rows without a key (or with None / a non-finite value for it) are skipped for that curve; a
    panel none of whose keys appears gets no subplot. A row without ``step`` uses its index.
    ``max_grad_norm`` draws the clipping norm on the gradient-norm panel; ``target_l0`` draws the
    target on the L0 panel and adds a panel for λ, which the target-L0 controller varies."""
    panels = PANELS + ([LAMBDA_PANEL] if target_l0 is not None else [])
    drawn = []
    for title, ylabel, keys, log in panels:
        curves = [(label, *_series(metrics_rows, key)) for key, label in keys]
        curves = [c for c in curves if c[1]]
        if curves:
            drawn.append((title, ylabel, curves, log))
    if not drawn:
        raise ValueError(f"plot_curves: no row has any of {[k for p in panels for k, _ in p[2]]}")

    columns = min(3 if len(drawn) <= 6 else 4, len(drawn))
    rows = -(-len(drawn) // columns)
    fig = _new_figure((4.6 * columns, 3.4 * rows))
    for j, (title, ylabel, curves, log) in enumerate(drawn):
        ax = fig.add_subplot(rows, columns, j + 1)
        every_y = [y for _, _, ys in curves for y in ys]
        percent = log == "percent"
        log = _is_log(log, every_y)
        marks = []
        if title == "L0" and target_l0 is not None:
            marks.append((target_l0, f"target {target_l0:g}"))
        if title.startswith("gradient norm") and max_grad_norm:
            marks.append((max_grad_norm, f"clipped above {max_grad_norm:g}"))
        points = [(x, y) for _, xs, ys in curves for x, y in zip(xs, ys)]
        limits = None if percent else _y_range(points, log, extra=[v for v, _ in marks])
        for k, (label, xs, ys) in enumerate(curves):
            # the second curve dashed: two equal curves (0% dead and 0% dense) are both seen
            (line,) = ax.plot(xs, ys, label=label, linewidth=1.3, linestyle="-" if k == 0 else "--")
            if limits is not None:  # points outside the fitted range: open markers at its edge
                lo, hi = limits
                off = [(x, min(max(y, lo), hi)) for x, y in zip(xs, ys) if not lo <= y <= hi]
                if off:
                    ox, oy = zip(*off)
                    ax.plot(ox, oy, linestyle="none", marker="o", markerfacecolor="none", color=line.get_color())
        for value, label in marks:
            ax.axhline(value, color="gray", linestyle="--", linewidth=1, label=label)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(_plain)  # 0.3, not 3×10⁻¹
            ax.yaxis.set_minor_formatter(_minor if limits and limits[1] / limits[0] < 300 else _no_label)
            if limits and _log_labels_within(*limits) < 2:  # e.g. L0 from 1,500 to 1,600: evenly spaced labels
                from matplotlib.ticker import MaxNLocator, NullFormatter

                ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
                ax.yaxis.set_minor_formatter(NullFormatter())
        if percent:
            ax.set_yscale("symlog", linthresh=0.1, linscale=0.5)
            ax.set_ylim(*PERCENT_LIMITS)
            ax.set_yticks([0, 0.1, 1, 10, 100])
            ax.yaxis.set_major_formatter(_plain)
        if limits is not None:
            ax.set_ylim(*limits)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.35)
        if log:
            ax.grid(True, which="minor", alpha=0.12)
        if len(curves) > 1 or marks:
            ax.legend(fontsize="small")
    last_row = metrics_rows[-1] if metrics_rows else {}
    if "tokens" in last_row:
        fig.suptitle(
            f"Training curves: {last_row.get('step', len(metrics_rows)):,} steps, {last_row['tokens']:,} tokens "
            f"(y ranges fitted to the steps after the first {SETTLED_FROM:.0%}; open circles: points beyond them)",
            fontsize="medium",
        )
    fig.tight_layout()
    _save_png(fig, path)


def plot_frontier(rows, path, swept, tokens=None):
    """A sweep's SAEs on the held-out set: FVU against L0 (log axis, since a λ sweep spreads L0
    over decades), one point per SAE labelled with its value and joined in order of L0, to
    ``path`` (PNG). ``rows`` are ``report.sweep.sweep_summary``'s; ``swept`` the option swept."""
    points = sorted((row["l0"], row["fvu"], row[swept]) for row in rows)
    fig = _new_figure((6.4, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", linewidth=1.3)
    for l0, fvu, value in points:
        ax.annotate(f"{value:g}", (l0, fvu), textcoords="offset points", xytext=(6, 6), fontsize="small")
    ax.set_xscale("log")
    ax.margins(0.12)  # room for the labels of the end points
    ax.xaxis.set_major_formatter(_plain)
    l0s = [p[0] for p in points if p[0] > 0]
    within_a_decade = bool(l0s) and max(l0s) < 10 * min(l0s)
    ax.xaxis.set_minor_formatter(_plain if within_a_decade else _minor)  # else 2, 3 and 5 only: no crowding
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    on = f" on {tokens:,} held-out tokens" if tokens else ""
    ax.set_title(
        f"L0-FVU frontier{on}\n{len(points)} SAEs from one stream, labelled with --{swept.replace('_', '-')}",
        fontsize="medium",
    )
    fig.tight_layout()
    _save_png(fig, path)
