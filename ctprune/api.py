"""`ctprune.prune(...)`: the whole pass, left to right.

    load → lift → prune while fine-tuning (ClickTrain) / crop channels (PreCropping) → write back → rewrite → save

Every check that can fail on the user's input runs before any training, and nothing is written until the end
(atomically), so a failed run leaves the input untouched and no partial output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import resource
import stat

import numpy as np
import onnx

from ctprune.errors import CtpruneError, Interrupted, ModelLoadError, RatioError
from ctprune.options import METHODS, PruneOptions  # noqa: F401 (METHODS re-exported)
from ctprune.graph.save import (check_distinct_paths, check_output_path, check_writable_folder, default_output_path,
                                external_data_files, save_model_atomic, write_json_atomic)

log = logging.getLogger(__name__)

__all__ = ["prune", "PruneResult", "METHODS"]

# Out-of-memory estimate: peak resident bytes per byte of weights. Measured on light VGG-19 with random weights
# (`ctprune vgg19.onnx --ratio 8x --epochs 0`, 0.575 GB of weights): 1.55-1.65 GB peak, about 2.3x beyond the
# start-up below; fine-tuning and the crop of --method precrop/both hold a few more copies (gradients, optimizer
# state, the cropped model), hence 3.
PEAK_PER_WEIGHT_BYTE = 3
BASELINE_BYTES = 600_000_000


@dataclasses.dataclass
class PruneResult:
    """What a run produced: the pruned model, its report, and where it was saved (None until saved)."""

    model: onnx.ModelProto
    report: dict
    output_path: pathlib.Path | None = None
    masked_dense: onnx.ModelProto | None = None  # pattern methods: the same weights as plain Convs with zeros

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        self.output_path = save_model_atomic(self.model, check_output_path(path, None))
        return self.output_path


_RATIO = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*[xX]?\s*$")


def parse_ratio(text: str) -> float:
    """'8x', '8', '8.0x' -> 8.0; anything that is not a number > 1 is a RatioError."""
    m = _RATIO.match(str(text))
    if not m:
        raise RatioError(f"--ratio {text!r} is not a compression ratio: write it as a number above 1, e.g. 8x, 8 or 4.5x.")
    value = float(m.group(1))
    if not value > 1.0:
        raise RatioError(
            f"--ratio {text!r} would not compress the model: the ratio is original size / pruned size, "
            "so it must be above 1 (e.g. 2x, 8x)."
        )
    return value


def _ratio_value(ratio) -> float:
    if isinstance(ratio, str):
        return parse_ratio(ratio)
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise RatioError(f"ratio {ratio!r} is not a number above 1 (e.g. 8 or '8x').") from None
    if not value > 1.0:
        raise RatioError(f"ratio {ratio!r} would not compress the model: it must be above 1 (e.g. 2, 8).")
    return value


def prune(model, ratio, *, output=None, report_path=None, keep_masked_dense=True, **options) -> PruneResult:
    """Prune an ONNX CNN; see contract.md. `output` (a path) saves the model there atomically; `report_path` the JSON.
    `keep_masked_dense=False` leaves PruneResult.masked_dense None, sparing a full copy of the weights for the run.

    `options`: the fields of ctprune.options.PruneOptions (method, data, eval_data, epochs, ...; the CLI's flags).
    `block=N` (1, 4, 8, 16): 3x3 pattern layers pruned in blocks of N similar filters that share every kernel.
    `schedule="oneshot"` is the prune-after baseline (magnitude masks chosen once, then the same fine-tune), kept for
    comparisons; ClickTrain's prune-during-fine-tuning is the default.
    """
    from ctprune.pipeline import Pipeline

    ratio_value = _ratio_value(ratio)
    opts = PruneOptions(**options)
    data, eval_data, epochs, resume = opts.data, opts.eval_data, opts.epochs, opts.resume
    model_path = model if isinstance(model, (str, os.PathLike)) else None
    if model_path is not None:
        _check_model_file(model_path)
    out_path = check_output_path(output, model_path) if output is not None else None
    if report_path is not None:
        check_output_path(report_path, model_path)
    checkpoint_dir = _checkpoint_dir(out_path, model_path)
    _check_no_clash(model_path, data, eval_data, out_path, report_path, checkpoint_dir)
    from ctprune.train.distributed import is_main_process

    trains = epochs is None or int(epochs) > 0
    if checkpoint_dir is not None and trains and is_main_process():
        from ctprune.pipeline import DEFAULT_EPOCHS
        from ctprune.train.checkpoint import prepare_run_folder

        check_writable_folder(checkpoint_dir.parent, f"cannot keep a checkpoint in {str(checkpoint_dir)!r}")
        settings = dict(opts.setting_values(), model=_source(model), ratio=ratio_value, data=_source(data),
                        eval_data=_source(eval_data), epochs=DEFAULT_EPOCHS if epochs is None else int(epochs),
                        input_size=_plain(opts.input_size), mean=_plain(opts.mean), std=_plain(opts.std))
        prepare_run_folder(checkpoint_dir, settings, resume)

    pipeline = Pipeline(model=model, ratio=ratio_value, checkpoint_dir=checkpoint_dir,
                        keep_masked_dense=keep_masked_dense, **dataclasses.asdict(opts))
    with _run_guard(checkpoint_dir, model_path, data, pipeline):
        pruned, report = pipeline.run()
        result = PruneResult(model=pruned, report=report, masked_dense=pipeline.masked_dense)
        if not is_main_process():  # torchrun: the other ranks trained alongside; rank 0 writes
            return result
        if out_path is not None:
            result.save(out_path)
        if report_path is not None:
            write_json_atomic(json.dumps(report, indent=2, default=_json_default), report_path)
    if checkpoint_dir is not None and getattr(pipeline, "_finished", False):
        from ctprune.train.checkpoint import remove_run_folder

        remove_run_folder(checkpoint_dir)  # only a folder ctprune marked as its own, and only its own files
    return result


def _check_model_file(model_path) -> None:
    """A path that is not a regular file (a FIFO would block the read forever, a device never ends) is refused
    from its stat, before anything opens it."""
    try:
        mode = os.stat(model_path).st_mode
    except OSError:
        return  # missing or unreadable: load_model names it
    if stat.S_ISDIR(mode):
        raise ModelLoadError(f"{model_path}: is a folder, not an ONNX file")
    if not stat.S_ISREG(mode):
        raise ModelLoadError(f"{model_path}: is not a regular file (a FIFO, device or socket); give the .onnx file")


def _check_no_clash(model_path, data, eval_data, out_path, report_path, checkpoint_dir) -> None:
    """No output may be an input (the model, its external-data files, the data) or another output."""
    outputs = {"the output": out_path, "the report": report_path}
    inputs = {"the input model": model_path, "--data": _path_or_none(data), "--eval-data": _path_or_none(eval_data)}
    existing = [p for p in (out_path, report_path, checkpoint_dir) if p is not None and os.path.lexists(p)]
    if model_path is not None and existing:  # only an existing path can be an existing weights file
        for path in external_data_files(model_path):
            inputs[f"the input model's external data file {str(path)!r}"] = path
    check_distinct_paths(inputs, outputs, checkpoint_dir)


@contextlib.contextmanager
def _run_guard(checkpoint_dir, model_path, data, pipeline=None):
    """Failures of the run itself, at the boundary: out of memory becomes one clear error; Ctrl-C says where the
    checkpoint is; a run folder that holds no checkpoint after a failure is removed again."""
    from ctprune.train.checkpoint import holds_checkpoint, remove_run_folder

    try:
        yield
    except BaseException as exc:
        kept = checkpoint_dir is not None and holds_checkpoint(checkpoint_dir)
        if checkpoint_dir is not None and not kept:
            remove_run_folder(checkpoint_dir)
        if isinstance(exc, KeyboardInterrupt) and kept:
            raise Interrupted(f"interrupted; the checkpoint is in {checkpoint_dir}: run the same command with "
                              "--resume to continue from it.") from None
        if _out_of_memory(exc):
            raise CtpruneError(_memory_message(model_path, data, exc, pipeline)) from None
        raise


def _out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or the out-of-memory forms of onnxruntime (std::bad_alloc), torch's allocator and protobuf
    (whose failed arena allocation surfaces as 'Failed to serialize proto')."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, Exception) and any(s in text for s in ("bad_alloc", "Failed to allocate memory",
                                                                  "can't allocate memory", "Failed to serialize proto"))


def _weight_bytes(model_path, pipeline) -> int:
    """The model's weights as the run holds them: the lifted model's tensors once it exists, else the loaded model's
    initializers and ConstantOfShape placeholders (which the lift materialises), else the files' sizes."""
    teacher = getattr(pipeline, "teacher", None)
    if teacher is not None:
        return sum(t.numel() * t.element_size() for t in list(teacher.parameters()) + list(teacher.buffers()))
    original = getattr(pipeline, "original", None)
    if original is not None:
        return _declared_weight_bytes(original)
    try:
        return os.path.getsize(model_path) + sum(os.path.getsize(p) for p in external_data_files(model_path)
                                                 if os.path.isfile(p)) if model_path is not None else 0
    except OSError:
        return 0


def _declared_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of float32 weights a model declares: its initializers and its ConstantOfShape placeholders."""
    initializers = {t.name: t for t in model.graph.initializer}
    total = sum(math.prod(t.dims) * 4 for t in model.graph.initializer)  # float32 in torch, whatever the file holds
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in initializers:
            shape = onnx.numpy_helper.to_array(initializers[node.input[0]]).reshape(-1)
            total += int(math.prod(int(d) for d in shape)) * 4
    return total


def _memory_message(model_path, data, exc, pipeline=None) -> str:
    """'needs about N GB; this machine has M': N from the weights and data and the pipeline's measured peak per byte
    of weights, or the failed request when the allocator names it (whichever is larger)."""
    weights = _weight_bytes(model_path, pipeline)
    data_bytes = sum(os.path.getsize(p) for p in (_path_or_none(data),) if p is not None and os.path.isfile(p))
    asked = re.search(r"allocate (\d+) bytes", str(exc))
    need = max(PEAK_PER_WEIGHT_BYTE * weights + 2 * data_bytes + BASELINE_BYTES, int(asked.group(1)) if asked else 0)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    where = f"this machine has {_gb(have)} ({_gb(free)} free)"
    if limit != resource.RLIM_INFINITY and limit < have:
        where += f", and this process may use {_gb(limit)} of address space (ulimit -v)"
    return (f"out of memory: the run needs about {_gb(need)}; {where}. Nothing was written. Free memory, raise the "
            "limit, or use a machine with more memory.")


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _source(spec):
    """A run input as plain JSON for the run file: a path resolved, an in-memory object by its kind and size."""
    if spec is None:
        return None
    if isinstance(spec, (str, os.PathLike)):
        return os.path.realpath(spec)
    size = len(spec) if hasattr(spec, "__len__") else None
    return f"<{type(spec).__name__}{'' if size is None else f' of {size}'}>"


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _path_or_none(spec):
    return spec if isinstance(spec, (str, os.PathLike)) else None


def _checkpoint_dir(out_path, model_path):
    """Checkpoints live beside the output (or the input) so `--resume` finds them: OUT.ckpt/."""
    base = out_path if out_path is not None else (default_output_path(model_path) if model_path else None)
    return None if base is None else pathlib.Path(str(base) + ".ckpt")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, pathlib.Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
