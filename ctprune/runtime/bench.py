"""Whole-model latency in onnxruntime: `ctprune bench MODEL [OTHER ...]`, and the report's `latency_ms`.

Every model runs in the same process, with the same thread count and the same inputs; runs alternate between the
models (one run each per round, the round's starting model rotating) so that a noisy neighbour or a clock change hits
all of them alike; the result is the median of `repeats` timed runs after `warmup` untimed ones. ctprune's kernel
library is registered in every session when it is built, so PatternConv models run through it; without it they run
through their model-local functions and the table says so. Each session's thread pool stops spinning when its run
returns (onnxruntime's `session.force_spinning_stop`): every session has its own pool, and with more than one thread a
pool left spinning after its run held a core the next model's run needed (light ResNet-50 on 2 threads, 2 cores: the
dense model's runs spread over 39-80 ms).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from ctprune.errors import CtpruneError, ModelLoadError
from ctprune.graph.filebacked import external_data_view, load_file_backed
from ctprune.ops.names import DOMAIN
from ctprune.runtime import kernel_library_path, register_kernels

log = logging.getLogger(__name__)

STOP_SPINNING_BETWEEN_RUNS = "session.force_spinning_stop"  # onnxruntime's session config key (see the module doc)

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]

_NUMPY_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass
class BenchRow:
    """One model's latency. `speedup` = the first model's median / this one's (the first row reads 1.0)."""

    model: str
    runs_with: str  # "ctprune kernels", "reference function (library not built)" or "onnxruntime"
    median_ms: float
    p10_ms: float
    p90_ms: float
    speedup: float
    threads: int
    batch: int
    runs: int


def _load(source: ModelSource, index: int) -> tuple[str, onnx.ModelProto]:
    """(label, model): a file's path, or for in-memory models its position and graph name."""
    if isinstance(source, onnx.ModelProto):
        return f"#{index} {source.graph.name or 'model'}", source
    if isinstance(source, bytes):
        model = onnx.load_from_string(source)
        return f"#{index} {model.graph.name or 'model'}", model
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: no such model file")
    try:  # read for its name and ops only: the weights stay in the file (onnxruntime reads them itself)
        return path, load_file_backed(path)
    except Exception as err:
        raise ModelLoadError(f"{path}: not a readable ONNX model ({err})") from err


def _file_session(path: str, model: onnx.ModelProto, options) -> ort.InferenceSession:
    """A session for the model file at `path` (`model`: it loaded file-backed). Its large weights are handed to
    onnxruntime as external data in the model file itself, so onnxruntime reads each tensor into its own buffer
    instead of the whole file and a parsed copy of it beside the tensors: VGG-19's session peaks 0.15 GB lower.
    Where that is refused, onnxruntime reads the file."""
    folder = external_data_view(model)
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        try:
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # an onnxruntime without that setting
            log.debug("%s: external-data view refused (%s); onnxruntime reads the file", path, err)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _serialized(source) -> bytes:
    return source if isinstance(source, bytes) else source.SerializeToString()


def uses_ctprune_ops(model: onnx.ModelProto) -> bool:
    return any(node.domain == DOMAIN for node in model.graph.node)


def random_feeds(session: ort.InferenceSession, batch: int, rng: np.random.Generator, where: str) -> dict:
    """Inputs for every graph input: the first dimension is the batch, every other one must be fixed."""
    feeds = {}
    for arg in session.get_inputs():
        shape = list(arg.shape)
        if shape and not isinstance(shape[0], int):
            shape[0] = batch
        elif shape and shape[0] != batch:
            raise CtpruneError(f"{where}: input {arg.name!r} has a fixed batch of {shape[0]}; run with --batch {shape[0]}")
        if any(not isinstance(d, int) for d in shape):
            raise CtpruneError(f"{where}: input {arg.name!r} has shape {arg.shape}; only the first (batch) dimension may be symbolic")
        dtype = _NUMPY_TYPES.get(arg.type)
        if dtype is None:
            raise CtpruneError(f"{where}: input {arg.name!r} has type {arg.type}, which the benchmark cannot fill")
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[arg.name] = np.zeros(shape, dtype=dtype)
    return feeds


def bench_models(
    models: Sequence[ModelSource],
    threads: int = 1,
    batch: int = 1,
    repeats: int = 50,
    warmup: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> list[BenchRow]:
    """Median latency of each model (paths, bytes or ModelProtos) in onnxruntime on CPU; see the module doc."""
    if not models:
        raise CtpruneError("no model to benchmark")
    try:
        kernel_library_path()
        library = True
    except CtpruneError as err:
        library = False
        log.debug("kernel library not available: %s", err)

    names, sessions, feeds, runs_with = [], [], [], []
    for index, source in enumerate(models, 1):
        name, model = _load(source, index)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.add_session_config_entry(STOP_SPINNING_BETWEEN_RUNS, "1")
        if library:
            register_kernels(options)
        custom = uses_ctprune_ops(model)
        if custom and not library:
            log.warning("%s: ctprune's kernel library is not built; PatternConv runs as its (slow) reference function", name)
        runs_with.append(
            ("ctprune kernels" if library else "reference function (library not built)") if custom else "onnxruntime"
        )
        if isinstance(source, (str, os.PathLike)):
            session = _file_session(os.fspath(source), model, options)
        else:
            session = ort.InferenceSession(_serialized(source), options, providers=["CPUExecutionProvider"])
        del model
        names.append(name)
        sessions.append(session)
        feeds.append(random_feeds(session, batch, np.random.default_rng(seed), name))

    for session, feed in zip(sessions, feeds):
        for _ in range(warmup):
            session.run(None, feed)

    times = [[] for _ in sessions]
    for round_ in tqdm(range(repeats), desc="bench", unit="round", disable=not progress, leave=False):
        for k in range(len(sessions)):
            i = (round_ + k) % len(sessions)
            start = time.perf_counter()
            sessions[i].run(None, feeds[i])
            times[i].append(time.perf_counter() - start)

    medians = [float(np.median(t)) * 1e3 for t in times]
    return [
        BenchRow(
            model=names[i], runs_with=runs_with[i], median_ms=medians[i],
            p10_ms=float(np.percentile(times[i], 10)) * 1e3, p90_ms=float(np.percentile(times[i], 90)) * 1e3,
            speedup=medians[0] / medians[i], threads=int(threads), batch=int(batch), runs=int(repeats),
        )
        for i in range(len(sessions))
    ]


def latency_ms(dense: ModelSource, pruned: ModelSource, threads: int = 1, batch: int = 1, repeats: int = 30) -> dict:
    """The report's `latency_ms`: {dense, pruned, threads, batch} medians in milliseconds."""
    rows = bench_models([dense, pruned], threads=threads, batch=batch, repeats=repeats, progress=False)
    return {"dense": rows[0].median_ms, "pruned": rows[1].median_ms, "threads": int(threads), "batch": int(batch)}


def render_bench(rows: Sequence[BenchRow]) -> str:
    """A printable table; speedups are relative to the first model."""
    header = ["model", "runs with", "median ms", "p10-p90 ms", "speedup"]
    body = [
        [r.model, r.runs_with, f"{r.median_ms:.3f}", f"{r.p10_ms:.3f}-{r.p90_ms:.3f}", f"{r.speedup:.2f}x"] for r in rows
    ]
    widths = [max(len(line[c]) for line in [header] + body) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    first = rows[0]
    lines.append(
        f"onnxruntime {ort.__version__}, CPU, {first.threads} thread(s), batch {first.batch}, "
        f"median of {first.runs} alternating runs per model"
    )
    return "\n".join(lines)
