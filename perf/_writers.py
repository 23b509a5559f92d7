"""Writers of the report: Markdown tables, raw JSON, PNG plot of speed-up against T, text summary.

Input: the ``run`` dict that ``report.py`` builds:
``{"meta": {...}, "checks": [...], "records": [...], "notes": [...]}``. A record is
``{"shape", "seq_len", "kind", "name", "direction", "ms", "reason", "note"}`` with ``ms`` None
when the piece did not run (``reason`` says why). Speed-up = baseline time / NSA time of the same
shape, length and direction in the same run: above 1 means NSA is faster.
"""

from __future__ import annotations

import json
import os
import pathlib

from _shapes import format_seq_len

__all__ = ["LABELS", "speedups", "markdown_table", "write_results", "write_json", "write_markdown", "write_plot",
           "summary_text"]

LABELS = {
    "nsa_attention": "flexnsa nsa_attention",
    "sdpa-cudnn": "SDPA cuDNN (full causal)",
    "sdpa-flash": "SDPA flash (full causal)",
    "flex-causal": "FlexAttention causal",
    "flex-window": "FlexAttention window",
    "fla-nsa": "fla-core parallel_nsa",
    "sdpa-cpu": "SDPA default (CPU, full causal)",
}
DIRECTIONS = ("fwd", "fwd+bwd")


def _lookup(records, **where) -> dict | None:
    for r in records:
        if all(r.get(k) == v for k, v in where.items()):
            return r
    return None


def _baselines(records) -> list[str]:
    names = []
    for r in records:
        if r["kind"] == "baseline" and r["name"] not in names:
            names.append(r["name"])
    return names


def _points(records) -> list[tuple[str, int]]:
    """(shape, T) pairs in run order."""
    seen = []
    for r in records:
        key = (r["shape"], r["seq_len"])
        if key not in seen:
            seen.append(key)
    return seen


def speedups(records) -> list[dict]:
    """One row per (shape, T, direction, baseline): ``{"..., "nsa_ms", "baseline_ms", "speedup"}``."""
    rows = []
    for shape, T in _points(records):
        for direction in DIRECTIONS:
            nsa = _lookup(records, shape=shape, seq_len=T, kind="nsa", direction=direction)
            for name in _baselines(records):
                base = _lookup(records, shape=shape, seq_len=T, kind="baseline", name=name, direction=direction)
                if base is None:
                    continue
                ratio = None
                if nsa and nsa["ms"] and base["ms"]:
                    ratio = base["ms"] / nsa["ms"]
                rows.append(
                    dict(shape=shape, seq_len=T, direction=direction, baseline=name,
                         nsa_ms=nsa["ms"] if nsa else None, baseline_ms=base["ms"], speedup=ratio)
                )
    return rows


def write_json(run: dict, path: pathlib.Path) -> None:
    data = dict(run, speedups=speedups(run["records"]))
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


# ---- Markdown -----------------------------------------------------------------------------------
class _Footnotes:
    """Numbers each distinct n/a reason once: cells read ``n/a [k]``."""

    def __init__(self):
        self.reasons: list[str] = []

    def cell(self, record: dict | None) -> str:
        if record is None:
            return ""
        if record["ms"] is not None:
            return _ms(record["ms"])
        reason = record.get("reason") or "unknown"
        if reason not in self.reasons:
            self.reasons.append(reason)
        return f"n/a [{self.reasons.index(reason) + 1}]"

    def lines(self) -> list[str]:
        return [f"{i + 1}. {reason}" for i, reason in enumerate(self.reasons)]


def _ms(ms: float) -> str:
    # 4 significant digits below 100 ms: a target such as "<= 40 ms" must be readable from the table
    return f"{ms:.4g}" if ms < 100 else f"{ms:.0f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def write_results(out_dir: str, name: str, md: list[str], raw) -> None:
    """A GPU script's results: ``<out_dir>/<name>.md`` (the lines ``md``) and ``<name>.json`` (``raw``)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(raw, f, indent=1)


def _speedup_tables(run: dict, notes: _Footnotes) -> list[str]:
    records = run["records"]
    baselines = _baselines(records)
    shapes = {s["name"]: s for s in run["meta"]["shapes"]}
    lines = []
    for shape_name in dict.fromkeys(r["shape"] for r in records):
        lines += ["", f"### {shapes[shape_name]['describe'] if shape_name in shapes else shape_name}", ""]
        header = ["T", "dir", "nsa_attention ms"] + [f"{LABELS.get(b, b)} ms (speed-up)" for b in baselines]
        rows = []
        for shape, T in _points(records):
            if shape != shape_name:
                continue
            for direction in DIRECTIONS:
                nsa = _lookup(records, shape=shape, seq_len=T, kind="nsa", direction=direction)
                nsa_cell = f"**{notes.cell(nsa)}**" if nsa and nsa["ms"] else notes.cell(nsa)
                row = [format_seq_len(T), direction, nsa_cell]
                for b in baselines:
                    base = _lookup(records, shape=shape, seq_len=T, kind="baseline", name=b, direction=direction)
                    cell = notes.cell(base)
                    if base and base["ms"] and nsa and nsa["ms"]:
                        cell += f" ({base['ms'] / nsa['ms']:.2f}x)"
                    row.append(cell)
                rows.append(row)
        lines += markdown_table(header, rows)
    return lines


def _stage_table(run: dict, notes: _Footnotes) -> list[str]:
    records = run["records"]
    stages = list(dict.fromkeys(r["name"] for r in records if r["kind"] == "stage"))
    if not stages:
        return []
    header = ["shape", "T", "dir"] + stages + ["sum of stages", "nsa_attention"]
    rows = []
    for shape, T in _points(records):
        for direction in DIRECTIONS:
            row = [shape, format_seq_len(T), direction]
            total, complete = 0.0, True
            for stage in stages:
                r = _lookup(records, shape=shape, seq_len=T, kind="stage", name=stage, direction=direction)
                if r is not None and r["ms"] is None and r.get("no_bwd"):
                    # forward-only stage (top-n): its forward is part of the forward+backward
                    r = _lookup(records, shape=shape, seq_len=T, kind="stage", name=stage, direction="fwd")
                    row.append(f"{notes.cell(r)} (fwd only)")
                else:
                    row.append(notes.cell(r))
                if r is None or r["ms"] is None:
                    complete = False
                else:
                    total += r["ms"]
            row.append(_ms(total) if complete else "")
            row.append(notes.cell(_lookup(records, shape=shape, seq_len=T, kind="nsa", direction=direction)))
            rows.append(row)
    return ["", "## Stages (ms)", "", *markdown_table(header, rows)]


def _module_table(run: dict, notes: _Footnotes) -> list[str]:
    records = [r for r in run["records"] if r["kind"] == "module"]
    if not records:
        return []
    rows = []
    for shape, T in _points(records):
        fwd = _lookup(records, shape=shape, seq_len=T, direction="fwd")
        bwd = _lookup(records, shape=shape, seq_len=T, direction="fwd+bwd")
        note = (fwd or bwd or {}).get("note", "")
        rows.append([shape, format_seq_len(T), notes.cell(fwd), notes.cell(bwd), note])
    header = ["shape", "T", "fwd ms", "fwd+bwd ms", "module"]
    return ["", "## NativeSparseAttention module, projections included (ms)", "", *markdown_table(header, rows)]


def _check_table(run: dict) -> list[str]:
    rows = []
    for c in run["checks"]:
        worst = max(c["errors"].items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1e-30), default=None)
        err = f"{worst[0]}: {worst[1][0]:.2e} vs {worst[1][1]:.2e}" if worst else ""
        agree = "" if c["selection_agreement"] is None else f"{c['selection_agreement']:.2%}"
        rows.append([c["shape"], str(c["seq_len"]), "yes" if c["ok"] else "**NO**", err, agree, c["message"]])
    header = ["shape", "T", "passed", "worst error (fast vs reference-in-dtype, both vs float64)",
              "top-n agreement", "failures"]
    return ["", "## Correctness gate", "", *markdown_table(header, rows)]


def write_markdown(run: dict, path: pathlib.Path, plot_name: str | None) -> None:
    meta = run["meta"]
    notes = _Footnotes()
    lines = [f"# flexnsa benchmark: {meta['device_name']}", ""]
    lines += [f"- {key}: {value}" for key, value in meta["header"].items()]
    lines += ["", "## nsa_attention against the baselines of the same run",
              "", "Milliseconds (median); in brackets the speed-up, baseline time / NSA time (> 1: NSA faster)."]
    lines += _speedup_tables(run, notes)
    if plot_name:
        lines += ["", f"![speed-up against T]({plot_name})"]
    lines += _stage_table(run, notes)
    lines += _module_table(run, notes)
    lines += _check_table(run)
    lines += ["", "## Notes", ""] + [f"- {n}" for n in run["notes"]]
    if notes.reasons:
        lines += ["", "## n/a reasons", "", *notes.lines()]
    path.write_text("\n".join(lines) + "\n")


# ---- plot -------------------------------------------------------------------------------------
def write_plot(run: dict, path: pathlib.Path) -> str | None:
    """Speed-up (baseline / NSA) against T, one panel per direction. Returns an error message
    instead of raising when matplotlib is missing or there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return "matplotlib is not installed: no PNG"
    rows = [r for r in speedups(run["records"]) if r["speedup"] is not None]
    if not rows:
        return "no speed-up could be computed: no PNG"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    markers = ["o", "s", "^", "D", "v", "P"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    for ax, direction in zip(axes, DIRECTIONS):
        for b_i, baseline in enumerate(dict.fromkeys(r["baseline"] for r in rows)):
            for s_i, shape in enumerate(shapes):
                pts = sorted((r["seq_len"], r["speedup"]) for r in rows
                             if r["direction"] == direction and r["baseline"] == baseline and r["shape"] == shape)
                if not pts:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker=markers[s_i % len(markers)], linestyle="-" if s_i == 0 else ":",
                        color=f"C{b_i}", label=f"{LABELS.get(baseline, baseline)} [{shape}]")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_seq_len(int(round(x)))))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.3g}x"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
        ax.set_xlabel("sequence length T")
        ax.set_title(f"{direction}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speed-up of nsa_attention (baseline time / NSA time)")
    handles, labels = axes[0].get_legend_handles_labels()
    for h, lab in zip(*axes[1].get_legend_handles_labels()):
        if lab not in labels:
            handles.append(h)
            labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"flexnsa on {run['meta']['device_name']}")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---- console ----------------------------------------------------------------------------------
def summary_text(run: dict) -> str:
    """A short fixed-width table: NSA ms and its speed-up over each baseline."""
    records = run["records"]
    baselines = _baselines(records)
    head = f"{'shape':<12}{'T':>6} {'dir':<8}{'nsa ms':>10}" + "".join(f"{b:>14}" for b in baselines)
    lines = [head, "-" * len(head)]
    for shape, T in _points(records):
        for direction in DIRECTIONS:
            nsa = _lookup(records, shape=shape, seq_len=T, kind="nsa", direction=direction)
            nsa_ms = nsa["ms"] if nsa else None
            line = f"{shape:<12}{format_seq_len(T):>6} {direction:<8}{_ms(nsa_ms) if nsa_ms else 'n/a':>10}"
            for b in baselines:
                base = _lookup(records, shape=shape, seq_len=T, kind="baseline", name=b, direction=direction)
                if base and base["ms"] and nsa_ms:
                    line += f"{base['ms'] / nsa_ms:>13.2f}x"
                elif base and base["ms"]:
                    line += f"{_ms(base['ms']) + 'ms':>14}"
                else:
                    line += f"{'n/a':>14}"
            lines.append(line)
    checks = ", ".join(f"{c['shape']}@{c['seq_len']}: {'ok' if c['ok'] else 'FAILED'}" for c in run["checks"])
    lines += ["(columns after nsa ms: speed-up = baseline time / NSA time; 'ms' when NSA has no time)",
              f"correctness gate: {checks or 'not run'}"]
    return "\n".join(lines)
