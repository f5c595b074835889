"""A sweep's combined report in ``--out``: ``summary.json`` (one row per SAE: its value, held-out
L0, FVU, dead and dense fractions, and the downstream cost with a model) and the printed table.
The frontier plot is ``plots.plot_frontier``."""

from __future__ import annotations

from pathlib import Path

SUMMARY_NAME = "summary.json"

# (row key, column title, format) of the printed table, after the SAE's name and value.
COLUMNS = [
    ("l0", "L0", ".2f"),
    ("fvu", "FVU", ".4f"),
    ("dead_fraction", "dead", ".1%"),
    ("dense_fraction", "dense", ".1%"),
    ("delta_ce", "delta CE", ".4f"),
]


def sweep_summary(members, reports: list[dict], swept: str) -> list[dict]:
    """One row per SAE, in the order of the values given."""
    rows = []
    for member, results in zip(members, reports):
        row = {
            "name": member.name,
            "folder": member.name,  # inside --out
            swept: getattr(member.cfg, swept),
            "l0_coefficient_final": member.coefficient.at(results["steps"]),  # λ reached (steered by --target-l0)
            # a --sparsity-warmup-steps longer than the run: λ_final is short of the value asked for
            "l0_coefficient_warming_up": member.cfg.target_l0 is None
            and results["steps"] < member.cfg.warmup("sparsity_warmup_steps"),
        }
        row.update({key: results[key] for key in ("l0", "fvu", "mse", "dead_fraction", "dense_fraction", "tokens")})
        if "downstream" in results:
            row["delta_ce"] = results["downstream"].get("delta_ce")
        rows.append(row)
    return rows


def _coefficient(row: dict) -> str:
    """The table's λ: where the run ended, starred if it had not reached the value asked for."""
    return f"{row['l0_coefficient_final']:.4g}" + ("*" if row.get("l0_coefficient_warming_up") else "")


def sweep_table(rows: list[dict], out: Path) -> str:
    """The printed summary: one aligned line per SAE, then where the files are."""
    columns = [c for c in COLUMNS if all(row.get(c[0]) is not None for row in rows)]
    header = ["SAE", "lambda", *(title for _, title, _ in columns)]
    body = [[row["name"], _coefficient(row), *(format(row[key], spec) for key, _, spec in columns)] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [f"evaluation on {rows[0]['tokens']} held-out tokens, {len(rows)} SAEs trained on the same batches:"]
    for line in [header, *body]:
        lines.append(
            "  "
            + "  ".join(
                cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(line, widths))
            )
        )
    if any(row.get("l0_coefficient_warming_up") for row in rows):
        lines.append(
            "  * still warming up at the last step (--sparsity-warmup-steps longer than --steps): "
            "lambda is short of --l0-coefficient"
        )
    lines.append(
        f"each SAE (SAELens layout) and its report in {out}/<SAE>/: cfg.json, sae_weights.safetensors, eval.json, "
        f"metrics.jsonl, density.png, curves.png; the table in {out}/{SUMMARY_NAME}, the L0-FVU frontier in "
        f"{out}/frontier.png"
    )
    return "\n".join(lines)
