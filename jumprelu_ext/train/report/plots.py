"""Training plots: feature-density histogram and training curves.

matplotlib is imported lazily, inside the functions, and only its non-interactive Agg canvas
is used (``Figure`` + ``FigureCanvasAgg``, not pyplot): no display is needed and the global
pyplot backend/state is left untouched. Files are written atomically with
``checkpoint.atomic_write`` (temporary file in the destination folder, then ``os.replace``).
"""

from ...files import atomic_write

__all__ = ["plot_density", "plot_curves"]

# (key, subplot title) in display order; missing keys are skipped.
CURVE_KEYS = [
    ("loss", "loss"),
    ("l0", "L0"),
    ("fvu", "FVU"),
    ("l0_coefficient", "λ (l0_coefficient)"),
    ("lr", "lr"),
]


def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def plot_density(firing_rates, path, bins=50):
    """Histogram of log10 feature firing rates to ``path`` (PNG); never-firing features
    (log10 0 = -inf) are not binned but counted in the title."""
    from .metrics import density_histogram

    hist = density_histogram(firing_rates, bins=bins)
    n = int(hist.counts.sum()) + hist.never_fired
    fig = _new_figure((6, 4))
    ax = fig.add_subplot(1, 1, 1)
    if hist.counts.sum() > 0:
        ax.stairs(hist.counts, hist.edges, fill=True)
    ax.set_xlabel("log10 firing rate")
    ax.set_ylabel("features")
    pct = 100.0 * hist.never_fired / n if n else 0.0
    ax.set_title(f"Feature density: {n} features, {hist.never_fired} never fired ({pct:.1f}%)")
    fig.tight_layout()
    _save_png(fig, path)


def plot_curves(metrics_rows, path):
    """A row of subplots (loss, L0, FVU, λ, lr present in the rows) against ``step`` to ``path``.

    Rows without a key (or with None for it) are skipped for that curve; a key absent from
    every row gets no subplot. A row without ``step`` uses its index."""
    series = []
    for key, title in CURVE_KEYS:
        xs, ys = [], []
        for i, row in enumerate(metrics_rows):
            v = row.get(key)
            if v is None:
                continue
            xs.append(row.get("step", i))
            ys.append(float(v))
        if xs:
            series.append((title, xs, ys))
    if not series:
        raise ValueError(f"plot_curves: no row has any of {[k for k, _ in CURVE_KEYS]}")

    fig = _new_figure((3.5 * len(series), 3))
    for j, (title, xs, ys) in enumerate(series):
        ax = fig.add_subplot(1, len(series), j + 1)
        ax.plot(xs, ys)
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    _save_png(fig, path)
