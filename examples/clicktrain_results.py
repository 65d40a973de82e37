"""ClickTrain on the Fashion-MNIST examples, in three sections:

- sweep: accuracy vs ratio (2.25x/4x/8x/16x) for both nets with a short fine-tune, plus the prune-after row at 8x;
- compare: prune-during (ClickTrain) vs prune-after (one-shot magnitude patterns + connectivity, then the same
  fine-tune) on the ResNet-20 at 8x with the longer fine-tune (issue 4: within 1 point of dense in <= 15 minutes);
- seeds: the same two rows at several seeds (the training subset, its order and the test images all follow the
  seed) and budgets, with the per-seed results and their means (single runs differ by a few tenths of a point);
- blocks: per-filter patterns (block 1) vs blocks of 4 / 8 / 16 filters sharing channels and patterns (`--block N`,
  what PatternConv's block kernel runs 16 filters at a time), both nets, at 4x and 8x, over seeds, same steps.

    .venv/bin/python examples/clicktrain_results.py                       # sweep and compare (about 45 min, 1 thread)
    .venv/bin/python examples/clicktrain_results.py --only compare        # re-run one section, keep the other's rows
    .venv/bin/python examples/clicktrain_results.py --only seeds --seeds 0,1,2 --seed-budgets 1x20000,1x0
    .venv/bin/python examples/clicktrain_results.py --only blocks --blocks 1,16 --seeds 0,1,2

Every run is recorded in examples/clicktrain_results.json (one record per net, ratio, schedule, budget and seed); the
Markdown (examples/RESULTS_clicktrain.md) and the plot (examples/clicktrain_results.png) are rendered from all records,
so re-running one section keeps the other. Torch trains on one thread (the machine's other core stays free).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ctprune  # noqa: E402
from ctprune.report.render import render_table  # noqa: E402

DATA = ROOT / ".deps" / "fashion-mnist"
MODELS = {"resnet20": ROOT / "examples" / "models" / "resnet20_fmnist.onnx",
          "vgg": ROOT / "examples" / "models" / "vgg_fmnist.onnx"}
RESULTS = ROOT / "examples" / "RESULTS_clicktrain.md"
RECORDS = ROOT / "examples" / "clicktrain_results.json"
NOTES_MARK = "<!-- notes -->"
HEADERS = ["net", "ratio", "pruning", "achieved", "dense acc %", "pruned acc %", "delta", "fine-tune s", "run s",
           "dense ms", "pruned ms", "speedup"]


def _subset(src: pathlib.Path, limit: int | None, seed: int, tmp: pathlib.Path) -> pathlib.Path:
    if not limit:
        return src
    d = np.load(src)
    idx = np.random.default_rng(seed).permutation(len(d["x"]))[:limit]
    out = tmp / f"{src.stem}_{limit}.npz"
    np.savez(out, x=d["x"][idx], y=d["y"][idx])
    return out


def _budget(epochs: int, train_limit: int) -> str:
    return f"{epochs} epoch(s) on {train_limit or 60000} images"


def _run(net, ratio, schedule, epochs, train_limit, eval_limit, seed, tmp, allocation="balanced", block=1) -> dict:
    train = _subset(DATA / "train.npz", train_limit, seed, tmp)
    test = _subset(DATA / "test.npz", eval_limit, seed, tmp)
    start = time.perf_counter()
    result = ctprune.prune(str(MODELS[net]), ratio=ratio, data=str(train), eval_data=str(test), epochs=epochs,
                           quiet=True, seed=seed, schedule=schedule, allocation=allocation,
                           **({"block": block} if block != 1 else {}))
    r = result.report
    rec = {"net": net, "ratio": ratio, "schedule": schedule, "allocation": allocation, "budget": _budget(epochs, train_limit),
           "steps": r["train"]["steps"], "eval_images": eval_limit or 10000, "acc_dense": r["accuracy"]["before"],
           "acc_pruned": r["accuracy"]["after"], "ratio_achieved": r["ratio_achieved"], "train_s": r["train"]["seconds"],
           "wall_s": time.perf_counter() - start, "lat_dense": r["latency_ms"]["dense"],
           "lat_pruned": r["latency_ms"]["pruned"], "seed": seed, "block": block}
    print(json.dumps(rec), flush=True)
    return rec


def _key(rec: dict) -> tuple:
    return (rec["net"], rec["ratio"], rec["schedule"], rec.get("allocation", "importance"), rec["budget"],
            rec.get("seed", 0), rec.get("block", 1))


def _seeds_table(records: list[dict]) -> str:
    """Prune-during vs prune-after per budget: each seed's accuracy and the means, where both ran at 2+ seeds."""
    groups: dict[tuple, dict[str, dict[int, dict]]] = {}
    for r in records:
        group = groups.setdefault((r["net"], r["ratio"], r.get("allocation", "importance"), r["budget"]), {})
        group.setdefault(r["schedule"], {})[r.get("seed", 0)] = r
    rows = []
    for (net, ratio, allocation, _), by_schedule in groups.items():
        during, after = by_schedule.get("clicktrain", {}), by_schedule.get("oneshot", {})
        seeds = sorted(set(during) & set(after))
        if len(seeds) < 2:
            continue
        acc = {name: [100 * runs[s]["acc_pruned"] for s in seeds]
               for name, runs in (("during", during), ("after", after))}
        steps = during[seeds[0]]["steps"]
        rows.append((net, ratio, allocation, steps, [
            net, f"{ratio:g}x", allocation, str(steps), ",".join(map(str, seeds)),
            " / ".join(f"{d:.2f} vs {a:.2f}" for d, a in zip(acc["during"], acc["after"])),
            f"{100 * float(np.mean([during[s]['acc_dense'] for s in seeds])):.2f}",
            f"{np.mean(acc['during']):.2f}", f"{np.mean(acc['after']):.2f}",
            f"{np.mean(acc['during']) - np.mean(acc['after']):+.2f}",
            f"{sum(d > a for d, a in zip(acc['during'], acc['after']))}/{len(seeds)}"]))
    if not rows:
        return ""
    headers = ["net", "ratio", "allocation", "steps", "seeds", "during vs after, per seed (%)", "dense %",
               "during %", "after %", "during - after", "seeds won"]
    table = render_table(headers, [row for *_, row in sorted(rows, key=lambda r: r[:4])], align="lllrllrrrrr")
    return f"### Prune-during (ClickTrain) vs prune-after (one-shot), same steps, over seeds\n\n```\n{table}\n```\n"


def _blocks_table(records: list[dict]) -> str:
    """Per-filter (block 1) vs filter blocks: each seed's accuracy, the mean, and the difference to block 1's mean
    over the same seeds, for every (net, ratio, budget) where block 1 and another block size ran."""
    groups: dict[tuple, dict[int, dict[int, dict]]] = {}
    for r in records:
        if r["schedule"] == "clicktrain":
            key = (r["net"], r["ratio"], r.get("allocation", "importance"), r["budget"])
            groups.setdefault(key, {}).setdefault(r.get("block", 1), {})[r.get("seed", 0)] = r
    rows = []
    for (net, ratio, allocation, budget), by_block in sorted(groups.items()):
        base = by_block.get(1, {})
        if not base or len(by_block) < 2:
            continue
        for b, runs in sorted(by_block.items()):  # block 1 over all its seeds; each other block beside the same seeds
            seeds = sorted(set(runs) & set(base))
            if not seeds:
                continue
            acc = [100 * by_block[b][s]["acc_pruned"] for s in seeds]
            ref = np.mean([100 * base[s]["acc_pruned"] for s in seeds])
            rows.append(((net, ratio, budget, b), [
                net, f"{ratio:g}x", budget, str(b), ",".join(map(str, seeds)), " / ".join(f"{a:.2f}" for a in acc),
                f"{100 * float(np.mean([base[s]['acc_dense'] for s in seeds])):.2f}", f"{np.mean(acc):.2f}",
                f"{np.mean(acc) - ref:+.2f}"]))
    if not rows:
        return ""
    headers = ["net", "ratio", "budget", "block", "seeds", "pruned acc per seed (%)", "dense %", "mean %",
               "vs block 1"]
    table = render_table(headers, [row for _, row in sorted(rows, key=lambda r: r[0])], align="lllrlrrrr")
    return ("### Filter blocks (`--block N`): ClickTrain per filter vs blocks of N filters sharing channels and "
            f"patterns, same steps, over seeds\n\n```\n{table}\n```\n")


def _row(rec: dict) -> list[str]:
    pruning = "ClickTrain (during)" if rec["schedule"] == "clicktrain" else "one-shot (after)"
    return [rec["net"], f"{rec['ratio']:g}x", f"{pruning}, {rec.get('allocation', 'importance')}",
            f"{rec['ratio_achieved']:.2f}x", f"{100 * rec['acc_dense']:.2f}", f"{100 * rec['acc_pruned']:.2f}",
            f"{100 * (rec['acc_pruned'] - rec['acc_dense']):+.2f}", f"{rec['train_s']:.0f}", f"{rec['wall_s']:.0f}",
            f"{rec['lat_dense']:.3f}", f"{rec['lat_pruned']:.3f}", f"{rec['lat_dense'] / rec['lat_pruned']:.2f}x"]


def main(argv=None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["sweep", "compare", "seeds", "blocks", "all", "render"], default="all",
                    help="run one section, sweep and compare (all), or nothing (re-render the tables and plot)")
    ap.add_argument("--nets", default="resnet20,vgg", help="nets of the sweep")
    ap.add_argument("--ratios", default="2.25,4,8,16", help="ratios of the sweep")
    ap.add_argument("--epochs", type=int, default=1, help="sweep: fine-tune epochs")
    ap.add_argument("--train-limit", type=int, default=12000, help="sweep: training images (0: all 60,000)")
    ap.add_argument("--compare-epochs", type=int, default=2, help="compare: fine-tune epochs")
    ap.add_argument("--compare-train-limit", type=int, default=0, help="compare: training images (0: all 60,000)")
    ap.add_argument("--compare-ratio", type=float, default=8.0)
    ap.add_argument("--schedules", default="clicktrain,oneshot", help="compare: which rows to run (clicktrain, oneshot)")
    ap.add_argument("--eval-limit", type=int, default=5000, help="test images used (0: all 10,000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--allocation", default="balanced", help="how kept kernels are split between layers (ctprune --allocation)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds: the seeds to run")
    ap.add_argument("--blocks", default="1,4,8,16", help="blocks: the filter block sizes to compare (1: per filter)")
    ap.add_argument("--block-ratios", default="4,8", help="blocks: the ratios")
    ap.add_argument("--seed-budgets", default="1x20000",
                    help="seeds: budgets as EPOCHSxIMAGES, comma-separated (IMAGES 0: all 60,000)")
    args = ap.parse_args(argv)
    unknown = set(args.schedules.split(",")) - {"clicktrain", "oneshot"}
    if unknown:
        ap.error(f"--schedules: unknown {', '.join(sorted(unknown))} (clicktrain, oneshot)")
    torch.set_num_threads(args.threads)

    store = RECORDS
    records = {_key(r): r for r in (json.loads(store.read_text()) if store.exists() else [])}
    runs = []
    if args.only in ("sweep", "all"):
        for net in args.nets.split(","):
            runs += [(net, float(r), "clicktrain", args.epochs, args.train_limit, args.seed)
                     for r in args.ratios.split(",")]
            runs.append((net, args.compare_ratio, "oneshot", args.epochs, args.train_limit, args.seed))
    if args.only in ("compare", "all"):
        runs += [("resnet20", args.compare_ratio, s, args.compare_epochs, args.compare_train_limit, args.seed)
                 for s in args.schedules.split(",")]
    if args.only == "seeds":
        try:
            budgets = [tuple(int(v) for v in b.split("x")) for b in args.seed_budgets.split(",")]
            seeds = [int(v) for v in args.seeds.split(",")]
        except ValueError:
            ap.error("--seed-budgets takes EPOCHSxIMAGES,... and --seeds integers, e.g. 1x20000,2x0 and 0,1,2")
        runs += [("resnet20", args.compare_ratio, s, epochs, limit, seed) for epochs, limit in budgets
                 for seed in seeds for s in args.schedules.split(",")]
    runs = [run + (1,) for run in runs]
    if args.only == "blocks":
        runs += [(net, float(r), "clicktrain", args.epochs, args.train_limit, int(seed), int(block))
                 for net in args.nets.split(",") for r in args.block_ratios.split(",")
                 for seed in args.seeds.split(",") for block in args.blocks.split(",")]
    fresh = {}
    with tempfile.TemporaryDirectory() as tmp:
        for net, ratio, schedule, epochs, limit, seed, block in runs:
            rec = _run(net, ratio, schedule, epochs, limit, args.eval_limit, seed, pathlib.Path(tmp), args.allocation,
                       block)
            fresh[_key(rec)] = rec
            if store.exists():  # another invocation (e.g. the other schedule, run alongside) may have added records
                records = {_key(r): r for r in json.loads(store.read_text())}
            records.update(fresh)
            store.write_text(json.dumps(list(records.values()), indent=1) + "\n")  # after each run: nothing is lost

    # The records may come from several invocations (one per section): name the script, not the last command line.
    command = "python examples/clicktrain_results.py"
    sections = []
    # the per-net tables: seed 0 (the sweep's), per-filter patterns
    seed0 = [r for r in records.values() if r.get("seed", 0) == 0 and r.get("block", 1) == 1]
    steps_of = {r["budget"]: r["steps"] for r in seed0}
    # the sections: most rows first (the sweep), then by length
    for budget in sorted(steps_of, key=lambda b: (-sum(1 for r in seed0 if r["budget"] == b), steps_of[b])):
        rows = [r for r in seed0 if r["budget"] == budget]
        rows.sort(key=lambda r: (r["net"] != "resnet20", r["net"], r.get("allocation", "importance"),
                                 r["schedule"] != "clicktrain", r["ratio"]))
        table = render_table(HEADERS, [_row(r) for r in rows], align="lllrrrrrrrrr")
        sections.append(f"### Fine-tune: {budget}, batch 64 ({steps_of[budget]} steps)\n\n```\n{table}\n```\n")
    text = ("# ClickTrain on Fashion-MNIST\n\n"
            f"Made by `{command}` (or one section at a time with `--only sweep|compare|seeds`) on this repo's "
            f"2-core CPU machine, torch on {args.threads} thread(s); "
            f"evaluation on {args.eval_limit or 10000} test images. `fine-tune s` is the training loop, `run s` the "
            "whole `ctprune.prune` call (teacher outputs, evaluation, latency). Latency: onnxruntime, 1 thread, "
            "batch 1, median.\n\n" + "\n".join(sections) + "\n" + _seeds_table(list(records.values()))
            + "\n" + _blocks_table(list(records.values()))
            + "\n![accuracy vs ratio](clicktrain_results.png)\n")
    # Hand-written notes below the marker survive a re-run.
    old = RESULTS.read_text() if RESULTS.exists() else ""
    notes = old.split(NOTES_MARK, 1)[1] if NOTES_MARK in old else ""
    RESULTS.write_text(text + "\n" + NOTES_MARK + notes if notes else text)
    _plot(seed0, RESULTS.with_name("clicktrain_results.png"))
    print(text)


def _plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for net in sorted({r["net"] for r in records}):
        mine = [r for r in records if r["net"] == net]
        sweep = max({r["budget"] for r in mine}, key=lambda b: sum(1 for r in mine if r["budget"] == b))
        pts = sorted((r["ratio"], 100 * r["acc_pruned"]) for r in mine if r["budget"] == sweep and r["schedule"] == "clicktrain")
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{net} ClickTrain, {sweep}")
        ax.axhline(100 * mine[0]["acc_dense"], color=line.get_color(), ls=":", label=f"{net} dense")
        for r in mine:
            marker = "x" if r["schedule"] == "oneshot" else "*"
            if r["budget"] != sweep or r["schedule"] == "oneshot":
                ax.plot([r["ratio"]], [100 * r["acc_pruned"]], marker, color=line.get_color(), ms=9,
                        label=f"{net} {'one-shot' if r['schedule'] == 'oneshot' else 'ClickTrain'}, {r['budget']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression of 3x3 conv weights")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
