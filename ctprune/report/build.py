"""The run report (contract.md) built from a plan and the two models: the same keys whatever the method.

A plan (PruningPlan or CropPlan) says which layers it pruned and how (`report_layers()`), their weights before and
after (`weight_totals()`) and what stayed dense and why (`dense_layers()`); the models give parameters and MACs
(MACs of the pruned model read off its graph: PatternConv and SparseConv count their kept weights, a layer kept dense
counts in full, as it runs).
"""

from __future__ import annotations

import math

import onnx

from ctprune.graph.constants import constant_dims
from ctprune.report.inspect import count_parameters, layer_table


# The note on the allocation appears when the pruned layers' multiply-adds fall by less than this share of the ratio.
MACS_SHORTFALL = 0.6


def build_report(original: onnx.ModelProto, pruned: onnx.ModelProto, plan, *, ratio: float, method: str,
                 kept_dense: dict[str, str], notes: list[str], weights: dict | None = None,
                 run_as_sparse: dict[str, str] | None = None, allocation: str | None = None, **measured) -> dict:
    """The report's dict. `weights` overrides the plan's weight totals (e.g. counted on the models); `measured`
    holds accuracy, agreement, latency_ms and train as the pipeline measured them, and any extra keys.
    `run_as_sparse`: {name: how} for dense layers the rewrite ran as SparseConv all the same (depthwise Convs beside
    pruned layers): added to their dense_layers reason. `allocation`: how the budget was split (pruning/allocation.py),
    for the note on multiply-adds."""
    totals = dict(plan.weight_totals())
    totals.update(weights or {})
    layers = plan.report_layers()
    if totals["after"]:
        note = allocation_note(layers, totals["before"] / totals["after"], allocation)
        if note:
            notes.append(note)
    dense = plan.dense_layers()
    if kept_dense:
        notes.append(f"{len(kept_dense)} pruned layer(s) kept as dense ops, their pruned weights zero (PatternConv or "
                     "SparseConv would not be faster there): " + ", ".join(list(kept_dense)[:6]))
    if dense:
        notes.append("kept dense: " + by_reason(dense))
    run_as_sparse = run_as_sparse or {}
    if run_as_sparse:
        notes.append(f"{len(run_as_sparse)} depthwise Conv(s) keep all their weights and run as SparseConv beside the "
                     "pruned layers, so onnxruntime inserts no NCHWc layout reorders between them")
    dense = {name: why + (f"; {run_as_sparse[name]}" if name in run_as_sparse else "") for name, why in dense.items()}
    return {
        "ratio_target": ratio,
        "ratio_achieved": totals["before"] / totals["after"] if totals["after"] else math.inf,
        "method": method,
        "conv_weights": totals,
        "params": {"before": count_parameters(original), "after": count_parameters(pruned)},
        "macs": {"before": layer_table(original)[1]["macs"], "after": layer_table(pruned)[1]["macs"]},
        "accuracy": measured.pop("accuracy", None),
        "agreement": measured.pop("agreement", None),
        "latency_ms": measured.pop("latency_ms", None),
        "train": measured.pop("train", None),
        "layers": mark_forms(layers, kept_dense),
        "dense_layers": [{"name": n, "reason": why} for n, why in dense.items()],
        "notes": notes,
        **measured,
    }


def allocation_note(rows: list[dict], weight_ratio: float, allocation: str | None) -> str | None:
    """A note when the pruned layers' multiply-adds fell much less than their weights (`rows`: report_layers() rows
    with macs_before / macs_after): the allocation kept the layers that do the most work per weight denser, so the
    run is smaller but not much faster. None when it did not, or when the allocation already spends by MACs."""
    before = sum(r.get("macs_before") or 0 for r in rows)
    after = sum(r.get("macs_after") or 0 for r in rows)
    if allocation in (None, "macs") or not before or not after:
        return None
    macs_ratio = before / after
    if macs_ratio >= MACS_SHORTFALL * weight_ratio:
        return None
    return (f"the pruned layers' multiply-adds fell {macs_ratio:.2f}x for {weight_ratio:.2f}x fewer weights: the "
            f"'{allocation}' allocation kept the layers with the most multiply-adds per weight denser; "
            "--allocation macs spends the budget on multiply-adds instead (faster; check the accuracy)")


def mark_forms(rows: list[dict], kept_dense: dict) -> list[dict]:
    """Rows of the pruned layers with their form: pattern / sparse / dense-kept (and why)."""
    out = []
    for row in rows:
        row = dict(row)
        if row["name"] in kept_dense:
            row.update(form="dense-kept", op="Gemm/MatMul" if row.get("kind") == "fc" else "Conv",
                       note=kept_dense[row["name"]])
        out.append(row)
    return out


def by_reason(layers: dict[str, str], shown: int = 4) -> str:
    """{layer: reason} -> 'reason: a, b, c and 9 more; other reason: d', most common reason first."""
    groups: dict[str, list[str]] = {}
    for name, why in layers.items():
        groups.setdefault(why, []).append(name)
    parts = []
    for why, names in sorted(groups.items(), key=lambda item: -len(item[1])):
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        parts.append(f"{why}: {', '.join(names[:shown])}{more}")
    return "; ".join(parts)


def conv_weights(model: onnx.ModelProto, only_3x3: bool = False) -> int:
    dims = constant_dims(model.graph, dtypes={onnx.TensorProto.FLOAT})
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in dims:
            shape = dims[node.input[1]]
            if only_3x3 and (len(shape) != 4 or shape[2:] != [3, 3]):
                continue
            total += math.prod(shape)
    return total
