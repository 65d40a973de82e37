"""`ctprune.prune(...)`: the whole pass, left to right.

    load → lift → prune while fine-tuning (ClickTrain) / crop channels (PreCropping) → write back → rewrite → save

Every check that can fail on the user's input runs before any training, and nothing is written until the end
(atomically), so a failed run leaves the input untouched and no partial output.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time

import numpy as np
import onnx

from ctprune.errors import CtpruneError, GraphError, RatioError
from ctprune.graph.save import check_output_path, default_output_path, save_model_atomic, write_json_atomic

log = logging.getLogger(__name__)

__all__ = ["prune", "PruneResult"]

DEFAULT_EPOCHS = 3
DEFAULT_SYNTHETIC_EPOCHS = 1
SYNTHETIC_SAMPLES = 512


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


def _ratio_value(ratio) -> float:
    if isinstance(ratio, str):
        from ctprune.cli import parse_ratio

        return parse_ratio(ratio)
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise RatioError(f"ratio {ratio!r} is not a number above 1 (e.g. 8 or '8x').") from None
    if not value > 1.0:
        raise RatioError(f"ratio {ratio!r} would not compress the model: it must be above 1 (e.g. 2, 8).")
    return value


def prune(
    model,
    ratio,
    *,
    output=None,
    method: str = "pattern",
    data=None,
    eval_data=None,
    epochs: int | None = None,
    batch_size: int = 64,
    lr: float | None = None,
    patterns: int = 8,
    allocation: str = "balanced",
    device: str = "auto",
    backend: str = "torch",
    report_path=None,
    seed: int = 0,
    resume: bool = False,
    quiet: bool = False,
    pai: str = "synflow-macs",
    init: str = "pretrained",
    channel_multiple: int = 8,
    drop_branches: bool = True,
    input_size=None,
    mean=None,
    std=None,
    first_conv_dense: bool = True,
    latency_threads: int = 1,
    schedule: str = "clicktrain",
) -> PruneResult:
    """Prune an ONNX CNN; see contract.md. `output` (a path) saves the model there atomically; `report_path` the JSON.

    `schedule="oneshot"` is the prune-after baseline (magnitude masks chosen once, then the same fine-tune), kept for
    comparisons; ClickTrain's prune-during-fine-tuning is the default.
    """
    from ctprune.pipeline import Pipeline
    from ctprune.pruning.connectivity import ALLOCATIONS

    ratio_value = _ratio_value(ratio)
    if method not in ("pattern", "precrop", "both"):
        raise CtpruneError(f"method {method!r} is not one of pattern, precrop, both.")
    if allocation not in ALLOCATIONS:
        raise CtpruneError(f"allocation {allocation!r} is not one of {', '.join(ALLOCATIONS)}.")
    model_path = model if isinstance(model, (str, os.PathLike)) else None
    out_path = None
    if output is not None:
        out_path = check_output_path(output, model_path)
    if report_path is not None:
        check_output_path(report_path, model_path)

    pipeline = Pipeline(
        model=model, ratio=ratio_value, method=method, data=data, eval_data=eval_data, epochs=epochs,
        batch_size=batch_size, lr=lr, patterns=patterns, allocation=allocation, device=device, backend=backend,
        seed=seed, resume=resume, quiet=quiet, pai=pai, init=init, channel_multiple=channel_multiple,
        drop_branches=drop_branches,
        input_size=input_size, mean=mean, std=std, first_conv_dense=first_conv_dense, latency_threads=latency_threads,
        schedule=schedule,
        checkpoint_dir=_checkpoint_dir(out_path, model_path),
    )
    pruned, report = pipeline.run()
    result = PruneResult(model=pruned, report=report, masked_dense=pipeline.masked_dense)
    from ctprune.train.distributed import is_main_process

    if not is_main_process():  # torchrun: the other ranks trained alongside; rank 0 writes
        return result
    if out_path is not None:
        result.save(out_path)
    if report_path is not None:
        write_json_atomic(json.dumps(report, indent=2, default=_json_default), report_path)
    pipeline.cleanup()
    return result


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
