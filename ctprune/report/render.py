"""The run report (contract.md) and its text rendering: a readable table at the end of every run."""

from __future__ import annotations

import math


def _fmt_int(n) -> str:
    return "-" if n is None else f"{int(n):,}"


def _fmt_ratio(before, after) -> str:
    if not before or not after:
        return "-"
    return f"{before / after:.2f}x"


def _fmt_pct(x) -> str:
    return "-" if x is None else f"{100.0 * x:.2f}%"


def render_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """Plain monospace table; align is one char per column, 'l' or 'r' (default: first left, rest right)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(values):
        return "  ".join(v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(values, widths, align))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def render_report(report: dict) -> str:
    """Per-layer table, then the totals a user asks about first: ratio, accuracy, latency."""
    layers = report.get("layers", [])
    rows = []
    for layer in layers:
        rows.append([
            layer["name"],
            layer.get("op", ""),
            "x".join(str(k) for k in layer.get("kernel", [])),
            f"{layer.get('in_channels', '')}->{layer.get('out_channels', '')}",
            _fmt_int(layer.get("weights_before")),
            _fmt_int(layer.get("weights_after")),
            _fmt_ratio(layer.get("weights_before"), layer.get("weights_after")),
            "-" if layer.get("pattern_count") is None else str(layer.get("pattern_count")),
            layer.get("note", ""),
        ])
    for layer in report.get("dense_layers", []):
        rows.append([layer["name"], "dense", "", "", "", "", "", "-", layer.get("reason", "")])
    parts = []
    if rows:
        parts.append(render_table(
            ["layer", "op", "kernel", "channels", "weights", "kept", "ratio", "patterns", "note"], rows,
            align="lllrrrrrl"))
    cw = report.get("conv_weights", {})
    params = report.get("params", {})
    macs = report.get("macs", {})
    acc = report.get("accuracy") or {}
    lat = report.get("latency_ms") or {}
    train = report.get("train") or {}
    summary = [
        ["method", report.get("method", "")],
        ["ratio (prunable layers)", f"{report.get('ratio_achieved', float('nan')):.2f}x achieved, "
                                 f"{report.get('ratio_target', float('nan')):.2f}x asked"],
        ["prunable weights", f"{_fmt_int(cw.get('before'))} -> {_fmt_int(cw.get('after'))}"],
    ]
    for form, row in (cw.get("by_form") or {}).items():
        summary.append([f"  {form} ({row['layers']})", f"{_fmt_int(row['before'])} -> {_fmt_int(row['after'])} "
                                                       f"({_fmt_ratio(row['before'], row['after'])})"])
    if report.get("block"):
        summary.append(["filter blocks", f"{report['block']} filters per block share every kernel "
                                         "(3x3 pattern layers)"])
    summary += [
        ["params (model)", f"{_fmt_int(params.get('before'))} -> {_fmt_int(params.get('after'))}"],
        ["MACs / sample", f"{_fmt_int(macs.get('before'))} -> {_fmt_int(macs.get('after'))}"],
    ]
    if acc:
        summary.append(["accuracy", f"{_fmt_pct(acc.get('before'))} -> {_fmt_pct(acc.get('after'))}"])
    if report.get("agreement") is not None:
        summary.append(["top-1 agreement with dense", _fmt_pct(report["agreement"])])
    if lat and lat.get("dense") is not None:
        speed = lat["dense"] / lat["pruned"] if lat.get("pruned") else math.nan
        summary.append(["latency (onnxruntime)", f"{lat['dense']:.3f} ms -> {lat['pruned']:.3f} ms ({speed:.2f}x), "
                                                 f"{lat.get('threads')} thread(s), batch {lat.get('batch')}"])
    if train:
        summary.append(["fine-tune", f"{train.get('epochs')} epoch(s), {train.get('seconds', 0):.1f} s, "
                                     f"{train.get('backend')} on {train.get('device')}"])
    width = max(len(k) for k, _ in summary)
    parts.append("\n".join(f"{k.ljust(width)}  {v}" for k, v in summary))
    notes = report.get("notes", [])
    if notes:
        parts.append("\n".join(f"note: {n}" for n in notes))
    return "\n\n".join(parts)
