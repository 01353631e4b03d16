"""The report's "Energy against latency" section, from the `energy` allocator's trade-off study
(``benchmarks/energy_tradeoff.py`` → ``energy_tradeoff*.json`` beside the results file): a table
with, per allocator (references `equal`, `minmax`; `energy` at each slack s), the mean latency and
device energy per prefill token with n and their standard errors, and the figure
``energy_tradeoff.png``: energy per token against latency per token, with error bars, one point
per slack on a line, the references as single markers; n, seed and configuration under it."""

import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wdmoe.errors import ConfigError
from wdmoe.studies.report.plots import _pyplot, _save

ENERGY_PLOT_NAME = "energy_tradeoff.png"
STUDY = "energy_tradeoff"
ROW_FIELDS = ("allocator", "slack", "n", "latency_per_token_s_mean", "energy_per_token_j_mean")
ENERGY_NOTES = """\
Each request is one prefill; its latency (s) and its devices' energy (J, compute + radio:
wdmoe.latency.energy) are divided by its tokens, then averaged over the n requests (± the standard
error, sample std / √n). `energy s=…`: the least radio energy split of each layer's band whose wait
is at most (1 + s) × the min-max optimum (wdmoe.allocation.energy); s = 0 is min-max's split.
×minmax: the mean of each request's ratio to its own min-max price (the same loads and channel)."""


def is_energy_file(path: Path) -> bool:
    """A JSON file written by the trade-off study (its "study" field)."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and payload.get("study") == STUDY


def find_energy_files(results: Path) -> list[Path]:
    """``energy_tradeoff*.json`` in the results file's folder (or in it, if a folder), and the
    results file itself when it is one."""
    results = Path(results)
    folder = results if results.is_dir() else results.parent
    found = [p for p in sorted(folder.glob(f"{STUDY}*.json")) if p.is_file() and is_energy_file(p)]
    if results.is_file() and results not in found and is_energy_file(results):
        found.append(results)
    return found


def read_energy_file(path: Path) -> dict[str, Any]:
    """The study's payload; a ConfigError naming the file and the missing field when it is not one."""
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = payload.get("rows") if isinstance(payload, dict) else None
    if not isinstance(rows, list) or not rows or "config" not in payload:
        raise ConfigError(f"{path}: not an energy trade-off result (needs 'config' and a non-empty 'rows')")
    for row in rows:
        missing = [f for f in ROW_FIELDS if f not in row]
        if missing:
            raise ConfigError(f"{path}: a row lacks {', '.join(missing)}")
    return dict(payload)


def _pm(row: Mapping[str, Any], name: str, scale: float, digits: int) -> str:
    mean, err = row[f"{name}_mean"] * scale, row.get(f"{name}_stderr", math.nan) * scale
    return f"{mean:.{digits}f}" + ("" if not math.isfinite(err) else f" ± {err:.{digits}f}")


def energy_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One Markdown row per allocator: latency (ms/token), energy, radio and compute (J/token),
    and the paired ratios to min-max."""
    header = (
        "allocator", "slack", "n", "latency ms/token", "energy J/token", "radio J/token",
        "compute J/token", "latency ×minmax", "energy ×minmax",
    )  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        slack = "–" if r["slack"] is None else f"{r['slack']:g}"
        cells = [
            str(r["allocator"]),
            slack,
            str(r["n"]),
            _pm(r, "latency_per_token_s", 1e3, 2),
            _pm(r, "energy_per_token_j", 1.0, 4),
            _pm(r, "radio_per_token_j", 1.0, 4) if "radio_per_token_j_mean" in r else "–",
            _pm(r, "compute_per_token_j", 1.0, 4) if "compute_per_token_j_mean" in r else "–",
            _pm(r, "latency_vs_minmax", 1.0, 3) if "latency_vs_minmax_mean" in r else "–",
            _pm(r, "energy_vs_minmax", 1.0, 3) if "energy_vs_minmax_mean" in r else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(config: Mapping[str, Any]) -> str:
    """The study's setting in one line: task, items × repeats, policy, seed, cell and model."""
    scenario = config.get("scenario") or {}
    model = scenario.get("model", {}).get("name", "?") if isinstance(scenario, Mapping) else "?"
    name = scenario.get("name", "?") if isinstance(scenario, Mapping) else "?"
    return (
        f"{config.get('task')} · {config.get('items')} items × {config.get('repeats')} passes · "
        f"{config.get('policy')} θ={config.get('theta')} · seed {config.get('seed')} · "
        f"`{name}` cell at {model} dimensions · router scores: {config.get('source_model')}"
    )


def plot_energy_tradeoff(payloads: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Energy per token (J) against latency per token (ms), ± standard errors: the slacks of each
    study on a line labelled with s, the references (no slack) as single markers."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, payload in enumerate(payloads):
        rows = payload["rows"]
        curve = sorted((r for r in rows if r["slack"] is not None), key=lambda r: r["slack"])
        xs = [1e3 * r["latency_per_token_s_mean"] for r in curve]
        ys = [r["energy_per_token_j_mean"] for r in curve]
        xerr = [1e3 * r.get("latency_per_token_s_stderr", 0.0) for r in curve]
        yerr = [r.get("energy_per_token_j_stderr", 0.0) for r in curve]
        ax.errorbar(
            xs, ys, xerr=xerr, yerr=yerr, fmt="-o", color=f"C{i}", capsize=2, label="energy (slack s)"
        )
        for k, (r, x, y) in enumerate(zip(curve, xs, ys, strict=True)):  # labels above and below, in turn
            at = (4, 4 if k % 2 == 0 else -10)
            ax.annotate(f"s={r['slack']:g}", (x, y), fontsize=7, xytext=at, textcoords="offset points")
        for j, r in enumerate(r for r in rows if r["slack"] is None):
            x, y = 1e3 * r["latency_per_token_s_mean"], r["energy_per_token_j_mean"]
            ax.errorbar([x], [y], fmt="sx^D"[j % 4], color=f"C{i + j + 1}", label=str(r["allocator"]))
    config = payloads[0]["config"]
    ns = sorted({r["n"] for p in payloads for r in p["rows"]})
    ax.set(xlabel="latency per token (ms)", ylabel="device energy per token (J)")
    title = textwrap.fill(f"n = {', '.join(map(str, ns))} · {describe(config)}", 110)
    ax.set_title(f"energy against latency\n{title}", fontsize=7)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def render_energy_section(
    payloads: Sequence[Mapping[str, Any]], plot: Path | None, heading: str = "##"
) -> str:
    """The section: per study its setting and table, then the notes and the figure."""
    parts = [f"{heading} Energy against latency\n"]
    for payload in payloads:
        parts.append(f"{describe(payload['config'])}\n")
        parts.append(energy_table(payload["rows"]) + "\n")
    parts.append(ENERGY_NOTES)
    parts += ["", f"![{plot.stem}]({plot.name})" if plot is not None else "", ""]
    return "\n".join(parts)


def write_energy_section(files: Sequence[Path], folder: Path) -> tuple[str, list[Path]]:
    """The section's Markdown and ``energy_tradeoff.png`` in ``folder``, from the study files."""
    payloads = [read_energy_file(p) for p in files]
    plot = plot_energy_tradeoff(payloads, Path(folder) / ENERGY_PLOT_NAME)
    return render_energy_section(payloads, plot), [plot]
