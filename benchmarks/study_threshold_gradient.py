"""Bias and variance of the batch θ-gradient estimator on a trained SAE (issue 25, item 4).

For a stratified sample of features of a trained SAE, on real pre-activations:

- the reference gradient g_i = ∂E[L]/∂θ_i of the loss the trainer minimises,
  L = ‖x − x̂‖² + λ·L0 per row (inputs scaled to E‖x‖² = 1, a mean over rows), by central finite
  differences in θ_i alone over every row of the data, in float64;
- the batch straight-through estimate of the same derivative: its mean and variance over
  batches of B rows drawn from the same rows, for a grid of bandwidths ε, for a per-feature ε
  from Silverman's rule, and for the rectangle, triangular and Epanechnikov kernels;

then bias, variance and MSE per feature, summaries and plots. One command:

    python benchmarks/study_threshold_gradient.py --sae DIR --data HELDOUT.npy

Exact per-row algebra instead of re-running the SAE. Only feature i's threshold moves, so a row
changes its loss only when pre_i crosses θ_i, by D_n = L_off − L_on (the row's loss with feature i
off minus with it on; the rest of the SAE fixed). Hence

    FD(h) = [E L(θ + h) − E L(θ − h)] / 2h = (1/2hN) Σ_{θ−h < z_n ≤ θ+h} D_n,

and the batch estimate is a mean of per-row terms k_n = −(1/ε)·K((z_n − θ)/ε)·(θ·∂R/∂f_i + λ)
(docs/method.md#straight-through-estimators), so over batches of B rows drawn from the N rows its
mean is mean_n k_n and its variance var_n k_n / B. The per-row terms are checked against the
package's own op (sae.loss backward) on disjoint batches before anything is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import jumprelu_ext
from jumprelu_ext.export import load_sae

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SAE = "/tmp/est25/sae"
# Training and held-out rows pooled: 8,192 held-out rows alone leave the FD reference too noisy
# at a step small enough for the curvature (docs/method.md#measured-bias-and-variance).
DEFAULT_DATA = ["/tmp/q65/cache/default_train.npy", "/tmp/q65/cache/default_heldout.npy"]
EPSILONS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
KERNELS = ("rectangle", "triangular", "epanechnikov")
# Finite-difference half-widths, as multiples of each feature's own step h_i (see fd_step).
FD_STEP_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)
# The rectangle of width ε has the same AMISE efficiency as a Gaussian of standard deviation
# ε / 3.48: the ratio of the kernels' canonical bandwidths (R(K)/μ₂(K)²)^(1/5), 144^(1/5) for the
# rectangle on (−½, ½) and (1/(2√π))^(1/5) for the Gaussian. Silverman's rule gives the Gaussian's.
RECTANGLE_PER_GAUSSIAN_SD = 144 ** (1 / 5) / (1 / (2 * math.sqrt(math.pi))) ** (1 / 5)


# ----------------------------------------------------------------------------- the SAE and the data
def load_scaled_sae(sae_dir: str) -> tuple[dict, float, float]:
    """The SAE's weights in the space it was trained in (inputs × c), float64; c and λ.

    The saved SAE takes raw x with c folded in (export.folded_weights); undoing the fold puts the
    loss back on the trainer's scale: x̂_scaled = c·x̂_raw, ‖c·x − c·x̂‖² = c²‖x − x̂‖².
    """
    cfg = json.loads((Path(sae_dir) / "cfg.json").read_text())
    ours = cfg["jumprelu_ext"]
    c = float(ours["input_scale"])
    lam = float(ours["extra"]["training_config"]["l0_coefficient"])
    sae = load_sae(sae_dir)
    w = {
        "W_enc": sae.W_enc.detach().double() / c,
        "b_enc": sae.b_enc.detach().double(),
        "W_dec": sae.W_dec.detach().double() * c,
        "b_dec": sae.b_dec.detach().double() * c,
        "threshold": sae.threshold.detach().double(),
    }
    return w, c, lam


def encode_rows(w: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-activations and residuals x − x̂ of scaled rows, float64."""
    pre = x @ w["W_enc"] + w["b_enc"]
    acts = pre * (pre > w["threshold"])
    return pre, x - (acts @ w["W_dec"] + w["b_dec"])


# ----------------------------------------------------------------------------- exact per-row algebra
def flip_gain(z, a, w_norm2, theta, lam):
    """D_n = L_off − L_on for each row: the loss change when the feature turns off at its current pre.

    a = ⟨x − x̂, w_i⟩ with x̂ the SAE's current reconstruction; a row that fires has f_i = z in x̂.
    on:  L_off − L_on = ‖r + z·w‖² − ‖r‖² − λ = 2za + z²‖w‖² − λ
    off: L_off − L_on = ‖r‖² − ‖r − z·w‖² − λ = 2za − z²‖w‖² − λ
    """
    sign = torch.where(z > theta, 1.0, -1.0).to(z.dtype)
    return 2 * z * a + sign * z * z * w_norm2 - lam


def finite_difference(z, gain, theta, h):
    """[E L(θ + h) − E L(θ − h)] / 2h over the rows, and its standard error as an estimate of the
    population derivative: rows with θ − h < z ≤ θ + h are on at θ − h and off at θ + h."""
    n = z.shape[0]
    crossing = ((z > theta - h) & (z <= theta + h)).to(z.dtype)
    per_row = crossing * gain / (2 * h)
    return per_row.sum(0) / n, per_row.std(0) / math.sqrt(n), crossing.sum(0)


def kernel(u, name: str):
    """K(u) on the open window (−½, ½), each integrating to 1 (so ε is the window's width for all)."""
    inside = ((u > -0.5) & (u < 0.5)).to(u.dtype)
    if name == "rectangle":
        return inside
    if name == "triangular":
        return inside * 4 * (0.5 - u.abs())
    if name == "epanechnikov":
        return inside * 6 * (0.25 - u * u)
    raise ValueError(f"unknown kernel {name!r}")


def ste_row_terms(z, a, theta, lam, eps, kernel_name="rectangle"):
    """Each row's term of the batch θ-gradient −(1/ε)·K((z − θ)/ε)·(θ·∂R/∂f + λ), ∂R/∂f = −2a.

    ε may be a scalar or one value per feature (broadcast over rows)."""
    return -kernel((z - theta) / eps, kernel_name) / eps * (theta * (-2 * a) + lam)


def batch_moments(terms, batch_size: int):
    """Mean and variance of a B-row batch mean of the per-row terms, rows drawn i.i.d. from these."""
    return terms.mean(0), terms.var(0, unbiased=False) / batch_size


def silverman_bandwidth(z, theta, fraction: float, batch_size: int):
    """Per-feature rectangle width ε_i from Silverman's rule on the pre-activations near θ_i.

    s_i = min(σ, IQR/1.34) of the given fraction of the rows whose pre_i lie nearest θ_i; the
    Gaussian bandwidth 0.9·s_i·B^(−1/5) for a density estimated from a batch of B rows, times 3.48
    for the rectangle.
    """
    window_rows = max(2, round(fraction * z.shape[0]))
    nearest = (z - theta).abs().topk(window_rows, dim=0, largest=False).indices
    local = z.gather(0, nearest)
    q75, q25 = torch.quantile(local, 0.75, dim=0), torch.quantile(local, 0.25, dim=0)
    spread = torch.minimum(local.std(0), (q75 - q25) / 1.34)
    return RECTANGLE_PER_GAUSSIAN_SD * 0.9 * spread * batch_size ** (-0.2)


def fd_step(z, theta, fraction: float):
    """Each feature's FD half-width h_i: the distance from θ_i within which a given fraction of the
    rows' pre_i lie, so the difference crosses the same number of rows whatever the density."""
    return (z - theta).abs().kthvalue(max(1, round(fraction * z.shape[0])), dim=0).values


def sample_features(fire_counts: torch.Tensor, count: int, min_fires: int, seed: int) -> torch.Tensor:
    """count features stratified by firing rate: one at random from each of count equal-size strata
    of the features that fire on at least min_fires rows, sorted by rate."""
    alive = torch.nonzero(fire_counts >= min_fires).flatten()
    ordered = alive[fire_counts[alive].argsort()]
    strata = torch.tensor_split(ordered, count)
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([s[torch.randint(len(s), (1,), generator=gen)] for s in strata]).flatten()


# ----------------------------------------------------------------------------- check against the op
def check_against_package_op(w, x, features, lam, eps, batch_size):
    """Max relative difference between the package's own θ-gradient (sae.loss backward, float64
    SAE) and the batch sums of ste_row_terms on disjoint batches, over the sampled features."""
    sae = jumprelu_ext.JumpReLUSAE(
        x.shape[1], w["W_enc"].shape[1], bandwidth=eps, threshold_param="raw", dtype=torch.float64
    )
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(w[name])
        sae.threshold.copy_(w["threshold"].float())
    theta = w["threshold"][features]
    worst = 0.0
    for rows in x.split(batch_size):
        sae.zero_grad()
        sae.loss(rows, lam, step="dense").total.backward()
        ours = sae.threshold.grad[features].double()
        pre, resid = encode_rows(w, rows)
        a = resid @ w["W_dec"][features].T
        mine = ste_row_terms(pre[:, features], a, theta, lam, eps).mean(0)
        scale = mine.abs().max().clamp_min(1e-12)
        worst = max(worst, float((ours - mine).abs().max() / scale))
    return worst


# ----------------------------------------------------------------------------- the study
def feature_quantities(w, x, features, chunk_rows=2048):
    """z = pre_i and a = ⟨x − x̂, w_i⟩ for the sampled features, [N, k] float64."""
    zs, as_ = [], []
    for rows in x.split(chunk_rows):
        pre, resid = encode_rows(w, rows)
        zs.append(pre[:, features])
        as_.append(resid @ w["W_dec"][features].T)
    return torch.cat(zs), torch.cat(as_)


def error_stats(terms, truth, batch_size):
    mean, var = batch_moments(terms, batch_size)
    bias = mean - truth
    return {"bias": bias, "var": var, "mse": bias**2 + var}


def fire_counts_of(w, x, chunk_rows=2048):
    return sum((encode_rows(w, rows)[0] > w["threshold"]).sum(0) for rows in x.split(chunk_rows))


def load_rows(paths, c):
    return torch.cat([torch.from_numpy(np.load(p)).double() for p in paths]) * c


def run_study(args) -> dict:
    w, c, lam = load_scaled_sae(args.sae)
    x = load_rows(args.data, c)
    n = x.shape[0]
    fire_counts = fire_counts_of(w, x)
    features = sample_features(fire_counts, args.features, args.min_fires, args.seed)
    op_check = {
        f"eps={e:g}": check_against_package_op(w, x[: 4 * args.batch_size], features, lam, e, args.batch_size)
        for e in (1e-2, 1e-1)
    }

    z, a = feature_quantities(w, x, features)
    theta = w["threshold"][features]
    w_norm2 = (w["W_dec"][features] ** 2).sum(1)
    gain = flip_gain(z, a, w_norm2, theta, lam)

    h = fd_step(z, theta, args.fd_fraction)
    fd = {m: finite_difference(z, gain, theta, m * h) for m in FD_STEP_MULTIPLES}
    truth, truth_se, crossed = fd[1.0]
    density = crossed / (2 * h * n)  # p_i(θ_i), the FD window's own estimate

    eps_silverman = silverman_bandwidth(z, theta, args.silverman_fraction, args.batch_size)
    rules = {f"{e:g}": torch.full_like(theta, e) for e in EPSILONS}
    rules["silverman"] = eps_silverman
    fd_rows = ((z > theta - h) & (z <= theta + h)) * gain / (2 * h)  # the FD's per-row terms
    errors = {}
    for kern in KERNELS:
        for rule, eps in rules.items():
            terms = ste_row_terms(z, a, theta, lam, eps, kern)
            errors[(kern, rule)] = error_stats(terms, truth, args.batch_size)
            # How well the bias itself is measured: the SE of mean_n(k_n − FD row terms).
            errors[(kern, rule)]["bias_se"] = (terms - fd_rows).std(0) / math.sqrt(n)
    return {
        "n_rows": n,
        "batch_size": args.batch_size,
        "lam": lam,
        "input_scale": c,
        "features": features,
        "fire_rate": fire_counts[features].double() / n,
        "theta": theta,
        "h": h,
        "fd": fd,
        "truth": truth,
        "truth_se": truth_se,
        "density": density,
        "scale": lam * density,  # λ·p_i(θ_i): the L0 term's share of the gradient, the unit of error
        "eps_silverman": eps_silverman,
        "errors": errors,
        "op_check": op_check,
    }


# ----------------------------------------------------------------------------- summaries
def median(t) -> float:
    return float(t.median())


def summarise(study: dict) -> dict:
    """Medians over the sampled features of the errors in units of λ·p_i(θ_i) (the gradient itself
    is near 0 at a trained threshold, so relative-to-g errors would mostly measure how close to
    stationary θ_i is); how often Silverman beats the best single ε."""
    scale2 = study["scale"] ** 2
    table = {}
    for (kern, rule), e in study["errors"].items():
        table[f"{kern}/{rule}"] = {
            "bias": median(e["bias"] / study["scale"]),
            "bias2": median(e["bias"] ** 2 / scale2),
            "var": median(e["var"] / scale2),
            "mse": median(e["mse"] / scale2),
            "rmse": median((e["mse"] / scale2).sqrt()),
            "bias_se": median(e["bias_se"] / study["scale"]),
        }
    rect_mse = torch.stack([study["errors"][("rectangle", f"{e:g}")]["mse"] / scale2 for e in EPSILONS])
    best_single = int(rect_mse.median(1).values.argmin())
    best_single_mse = rect_mse[best_single]
    silverman_mse = study["errors"][("rectangle", "silverman")]["mse"] / scale2
    truth = study["truth"]
    return {
        "n_features": int(len(truth)),
        "n_rows": study["n_rows"],
        "table": table,
        "best_single_eps": EPSILONS[best_single],
        "silverman_beats_best_single": float((silverman_mse < best_single_mse).double().mean()),
        "median_mse_ratio_silverman_to_best_single": median(silverman_mse / best_single_mse),
        "median_mse_ratio_oracle_to_best_single": median(rect_mse.min(0).values / best_single_mse),
        "best_eps_counts": {f"{e:g}": int((rect_mse.argmin(0) == j).sum()) for j, e in enumerate(EPSILONS)},
        "median_grad_over_scale": median(truth / study["scale"]),
        "median_abs_grad_over_scale": median(truth.abs() / study["scale"]),
        "median_grad_se_over_scale": median(study["truth_se"] / study["scale"]),
        "fd_change_over_scale": {
            f"{m:g}h": median((study["fd"][m][0] - truth).abs() / study["scale"]) for m in FD_STEP_MULTIPLES
        },
        "median_h": median(study["h"]),
        "density_range": [float(study["density"].min()), float(study["density"].max())],
        "fire_rate_range": [float(study["fire_rate"].min()), float(study["fire_rate"].max())],
        "eps_silverman_range": [float(study["eps_silverman"].min()), float(study["eps_silverman"].max())],
        "median_eps_silverman": median(study["eps_silverman"]),
        "op_check_max_rel_diff": study["op_check"],
    }


def per_feature_rows(study: dict) -> list[dict]:
    rows = []
    for j, f in enumerate(study["features"].tolist()):
        row = {
            "feature": f,
            "fire_rate": float(study["fire_rate"][j]),
            "theta": float(study["theta"][j]),
            "density_at_theta": float(study["density"][j]),
            "h": float(study["h"][j]),
            "grad_fd": float(study["truth"][j]),
            "grad_fd_se": float(study["truth_se"][j]),
            "eps_silverman": float(study["eps_silverman"][j]),
        }
        for (kern, rule), e in study["errors"].items():
            row[f"{kern}/{rule}"] = {k: float(e[k][j]) for k in ("bias", "var", "mse")}
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- plots
def plot(study: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    scale, scale2 = study["scale"], study["scale"] ** 2
    fig, axes = plt.subplots(2, 2, figsize=(14, 11))

    ax = axes[0, 0]
    multiples = np.array(FD_STEP_MULTIPLES)
    curves = torch.stack([study["fd"][m][0] / scale for m in FD_STEP_MULTIPLES])  # [m, k]
    for j in range(curves.shape[1]):
        ax.plot(multiples, curves[:, j].numpy(), color="tab:blue", alpha=0.25, lw=1)
    ax.plot(multiples, curves.median(1).values.numpy(), color="k", lw=2.5, label="median over features")
    ax.errorbar(
        [1.0] * curves.shape[1],
        curves[2].numpy(),
        yerr=(study["truth_se"] / scale).numpy(),
        fmt="none",
        ecolor="tab:red",
        alpha=0.4,
        label="± 1 SE of the FD at h_i (sampling)",
    )
    ax.set_xscale("log")
    ax.set_xticks(multiples, [f"{m:g}" for m in multiples], minor=False)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("finite-difference half-width / h_i")
    ax.set_ylabel("FD estimate of ∂E[L]/∂θ_i  /  λ·p_i(θ_i)")
    ax.set_title(f"(a) reference gradient against the FD step (h_i: {study['fd_fraction']:.2%} of rows within ±h_i)")
    ax.legend()

    ax = axes[0, 1]
    styles = {"rectangle": "-", "triangular": "--", "epanechnikov": ":"}
    names = {"bias2": "bias²", "var": "variance", "mse": "MSE"}
    for kern in KERNELS:
        for key, colour in (("bias2", "tab:red"), ("var", "tab:blue"), ("mse", "k")):
            vals = [summary["table"][f"{kern}/{e:g}"][key] for e in EPSILONS]
            ax.plot(EPSILONS, vals, styles[kern], color=colour, marker="o", ms=4, label=f"{names[key]}, {kern}")
    sil = summary["table"]["rectangle/silverman"]
    ax.scatter(
        [summary["median_eps_silverman"]],
        [sil["mse"]],
        marker="*",
        s=250,
        color="tab:green",
        zorder=5,
        label="MSE, rectangle, Silverman ε_i (at median ε_i)",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bandwidth ε (inputs scaled to E‖x‖² = 1)")
    ax.set_ylabel("median over features of error² / (λ·p_i(θ_i))²")
    ax.set_title(f"(b) one batch of {study['batch_size']} rows: bias², variance, MSE")
    ax.legend(fontsize=7, ncol=2)

    ax = axes[1, 0]
    rect_mse = torch.stack([study["errors"][("rectangle", f"{e:g}")]["mse"] for e in EPSILONS])
    best_eps = torch.tensor(EPSILONS, dtype=torch.float64)[rect_mse.argmin(0)]
    jitter = torch.exp(
        0.08 * torch.randn(len(best_eps), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    ax.scatter(study["density"], best_eps * jitter, label="lowest-MSE ε of the grid (jittered)", color="tab:red")
    ax.scatter(study["density"], study["eps_silverman"], label="Silverman ε_i", color="tab:green", marker="x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("density of pre_i at θ_i, p_i(θ_i)")
    ax.set_ylabel("bandwidth ε")
    ax.set_title("(c) the ε each feature wants, by its density at θ_i")
    ax.legend()

    ax = axes[1, 1]
    best_single = summary["best_single_eps"]
    x_rel = (study["errors"][("rectangle", f"{best_single:g}")]["mse"] / scale2).sqrt()
    y_rel = (study["errors"][("rectangle", "silverman")]["mse"] / scale2).sqrt()
    sc = ax.scatter(x_rel, y_rel, c=np.log10(study["density"].numpy()), cmap="viridis")
    fig.colorbar(sc, ax=ax, label="log10 p_i(θ_i)")
    lo, hi = float(min(x_rel.min(), y_rel.min())), float(max(x_rel.max(), y_rel.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", ls=":", label="equal error")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"RMSE / λ·p_i(θ_i), rectangle, best single ε = {best_single:g}")
    ax.set_ylabel("RMSE / λ·p_i(θ_i), rectangle, Silverman ε_i")
    ax.set_title("(d) per-feature ε against the best single ε (below the line: per-feature better)")
    ax.legend()

    fig.suptitle(
        f"θ-gradient estimator: {summary['n_features']} features, {study['n_rows']} rows, λ = {study['lam']:g}",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(summary: dict) -> str:
    lines = [
        "Errors of one batch's θ-gradient in units of λ·p_i(θ_i), medians over the features; the",
        f"reference gradient itself: median {summary['median_grad_over_scale']:+.3g}.",
        "",
        "| kernel / ε | bias | bias² | variance | MSE | RMSE | SE of the bias measurement |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, row in summary["table"].items():
        lines.append(
            f"| {key} | {row['bias']:+.3g} | {row['bias2']:.3g} | {row['var']:.3g} | {row['mse']:.3g} | {row['rmse']:.3g} | {row['bias_se']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sae", default=DEFAULT_SAE, help="SAE folder written by the trainer (save_sae)")
    p.add_argument("--data", nargs="+", default=DEFAULT_DATA, help="activation .npy files [N, d_in], raw; rows pooled")
    p.add_argument(
        "--out-prefix", default=None, help="output path prefix (default: benchmarks/results/threshold_gradient_<stamp>)"
    )
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--min-fires", type=int, default=20, help="sample only features firing on at least this many rows")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--fd-fraction", type=float, default=0.002, help="share of the rows within ±h_i of θ_i (FD step)")
    p.add_argument(
        "--silverman-fraction", type=float, default=1 / 32, help="share of rows nearest θ_i for Silverman's spread"
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    torch.set_num_threads(1)
    args = parse_args(argv)
    start = time.time()
    study = run_study(args)
    study["fd_fraction"] = args.fd_fraction
    summary = summarise(study)
    prefix = Path(args.out_prefix or RESULTS / f"threshold_gradient_{time.strftime('%Y%m%d-%H%M')}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    plot(study, summary, prefix.with_suffix(".png"))
    record = {
        "args": vars(args),
        "torch": torch.__version__,
        "seconds": round(time.time() - start, 1),
        "summary": summary,
        "features": per_feature_rows(study),
    }
    prefix.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    prefix.with_suffix(".md").write_text(markdown(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "table"}, indent=1))
    print(markdown(summary))
    print(f"wrote {prefix}.png/.json/.md in {record['seconds']} s")


if __name__ == "__main__":
    main()
