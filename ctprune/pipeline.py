"""One ctprune run, left to right: load → lift → prune while fine-tuning / crop → write back → rewrite → report.

`ctprune.prune()` (api.py) checks paths and saves; this module does the work. Each stage is one method, so the data
path reads top to bottom in `_run()`. Every check on the user's input (model, ops, ratio, data) runs before training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os

import numpy as np
import onnx
import torch

from ctprune.options import PruneOptions
from ctprune.runtime.memory import map_large_blocks, release_freed_memory
from ctprune.errors import DataError, GraphError, RatioError
from ctprune.train.data import check_input_size, require_fixed_input
from ctprune.train.loop import first_output as _first

log = logging.getLogger("ctprune")

DEFAULT_EPOCHS = 3
SYNTHETIC_SAMPLES = 512
SYNTHETIC_BYTES = 256_000_000  # at most this much synthetic data: a detector's input is megabytes per sample
CHECK_SAMPLES = 16  # without eval data, the pruned model is checked against the trained module on this many inputs
CALIBRATION_BATCHES = 8  # --epochs 0: importance from this many batches
DEFAULT_LR = {"pretrained": 0.01, "scratch": 0.05}


@dataclasses.dataclass(kw_only=True)
class Pipeline(PruneOptions):
    """One run: the model, the ratio and every PruneOptions field (ctprune/options.py)."""

    model: object
    ratio: float
    checkpoint_dir: object = None
    pruner_options: dict | None = None  # extra ClickTrainPruner knobs (warmup, soft, lasso_lambda, ...), for experiments
    keep_masked_dense: bool = True  # pattern methods: keep the masked dense model (PruneResult.masked_dense)

    # ---- the pass -------------------------------------------------------------------------------------------------
    def run(self) -> tuple[onnx.ModelProto, dict]:
        # without training the peak is the weights plus the selection's transients: none may linger in the heap
        with map_large_blocks() if self._epochs() == 0 else contextlib.nullcontext():
            return self._run()

    def _run(self) -> tuple[onnx.ModelProto, dict]:
        from ctprune.graph import check_supported, load_model

        torch.manual_seed(self.seed)
        self.notes: list[str] = []
        self.masked_dense = None
        # pattern/auto read the input's weights once, into the lifted module: from a file they stay there until then
        file_backed = self.method in ("pattern", "auto") and self._model_path() is not None
        self.original = load_model(self.model, file_backed=file_backed)
        check_supported(self.original)  # every unsupported op, named, before any work
        self.teacher = self._lift(self.original).eval()
        self.input_shape = list(self.teacher.input_shapes[0])
        require_fixed_input(self.input_shape)  # the rewrite and the latency step need it: refuse before training
        self.num_classes = self._num_classes()
        self.train_set, self.eval_set = self._load_data()
        if self.method in ("pattern", "auto"):
            pruned, plan_report = self._pattern(self.original, self.ratio)
        elif self.method == "precrop":
            pruned, plan_report = self._precrop()
        else:
            pruned, plan_report = self._both()
        from ctprune.train.distributed import is_main_process

        if not is_main_process():  # under torchrun only rank 0 evaluates, reports and writes
            return pruned, {}
        report = self._report(pruned, plan_report)
        return pruned, report

    # ---- stages ---------------------------------------------------------------------------------------------------
    def _lift(self, model):
        from ctprune.graph import lift

        return lift(model)

    def _num_classes(self) -> int | None:
        """Class count from the first output's shape ((N, K) classifiers); None for anything else."""
        sample = self._zeros_input(1)
        if sample is None:
            return None
        with torch.no_grad():
            out = self.teacher(sample)
        out = out[0] if isinstance(out, tuple) else out
        return int(out.shape[1]) if out.dim() == 2 else None

    def _zeros_input(self, batch: int):
        dims = self.input_shape[1:]
        if not all(isinstance(d, int) and d > 0 for d in dims):
            return None
        return torch.zeros([batch, *dims])

    def _load_data(self):
        from ctprune.train import load_data, synthetic_data

        kw = dict(num_classes=self.num_classes, input_size=_ints(self.input_size, "--input-size"),
                  mean=_floats(self.mean, "--mean"), std=_floats(self.std, "--std"))
        if self.data is not None:
            train = load_data(self.data, self.input_shape, **kw)
        else:
            if self._zeros_input(1) is None:
                raise DataError(f"the model's input shape {self.input_shape} has free dimensions besides the batch, "
                                "so ctprune cannot make synthetic inputs: give --data.")
            check_input_size(kw["input_size"], self.input_shape)  # given without data, it must still fit
            per_sample = 4 * math.prod(self.input_shape[1:])
            budget = min(SYNTHETIC_SAMPLES, SYNTHETIC_BYTES // per_sample)
            if self._epochs():
                samples = max(2 * self.batch_size, budget)
            else:  # only the calibration batches and the check read it; the same draw's first samples
                samples = max(8, min(budget, max(self.batch_size * CALIBRATION_BATCHES, CHECK_SAMPLES)))
            train = synthetic_data(self.input_shape, samples, seed=self.seed)
            self.notes.append(f"no --data: {samples} synthetic (random normal) inputs stood in for data, "
                              "the dense model's outputs for labels; accuracy was not measured")
        evaluation = load_data(self.eval_data, self.input_shape, **kw) if self.eval_data is not None else None
        return train, evaluation

    def _epochs(self) -> int:
        return DEFAULT_EPOCHS if self.epochs is None else int(self.epochs)

    def _fine_tune(self, student, hooks=None, checkpoint_tag: str = "", lr: float | None = None):
        from ctprune.train import fine_tune

        ckpt = None
        if self.checkpoint_dir is not None:
            ckpt = self.checkpoint_dir / checkpoint_tag if checkpoint_tag else self.checkpoint_dir
        return fine_tune(
            student, self.teacher, self.train_set, self.eval_set, epochs=self._epochs(), batch_size=self.batch_size,
            lr=lr or self.lr or DEFAULT_LR["pretrained"], device=self.device, hooks=hooks, seed=self.seed,
            checkpoint_dir=ckpt, resume=self.resume, quiet=self.quiet, backend=self.backend,
        )

    def _decide(self, model, student):
        """Which layers prune in which form (pruning/layers.py): 3x3 only for --method pattern, every form else."""
        from ctprune.graph import conv_layers, fc_layers
        from ctprune.pruning.layers import decide_layers

        layers = conv_layers(model)
        fcs = fc_layers(model) if self.method != "pattern" else []
        return layers, decide_layers(layers, fcs, student.onnx_parameters(), method=self.method,
                                     keep_first_dense=self.first_conv_dense, prune_head=self.prune_head)

    def _pattern(self, model, ratio, checkpoint_tag: str = ""):
        """ClickTrain: pattern library (3x3) and blocks (the rest) → soft masks at a rising ratio → hard masks →
        PatternConv / SparseConv."""
        from ctprune.graph import write_back
        from ctprune.pruning import ClickTrainPruner, OneShotPruner
        from ctprune.rewrite import rewrite_model

        student = self._student(model)
        if model is self.original and self._model_path() is not None:
            # From here on the weights live in the lifted modules: the input model is read for its graph and
            # dims only (the latency step reads the file itself), so its copy of every weight is dropped.
            from ctprune.graph.writeback import without_trained

            model = self.original = without_trained(model, student)
        layers, decision = self._decide(model, student)
        weights, skipped, macs = decision.weights, decision.skipped, decision.macs
        if not weights:
            reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:6])
            what = ("no Conv that pattern pruning can take (3x3, group 1, dilation 1)" if self.method == "pattern"
                    else "no layer ctprune can prune (every Conv is depthwise or the first, no FC layer but the head)")
            hint = "--method auto or precrop" if self.method == "pattern" else "--method precrop (or --prune-head)"
            raise GraphError(f"the model has {what}" + (f" — {reasons}" if reasons else "") + f". Try {hint}.")
        release_freed_memory()  # what loading and lifting freed, before the selection's own peak
        pruner_class = OneShotPruner if self.schedule == "oneshot" else ClickTrainPruner
        pruner = pruner_class(weights, ratio=ratio, patterns=self.patterns, skipped=skipped, macs=macs,
                              allocation=self.allocation, sparse=decision.sparse, costs=decision.cost,
                              max_density=decision.max_density, block=self.block,
                              **(self.pruner_options or {}))
        if self._epochs() == 0:
            if pruner.importance_kind != "magnitude":  # gradient importance needs a few batches first
                self._calibrate(pruner, student)
            plan = pruner.prune_now()
            self.train_result = None
        else:
            recalibration = self._recalibration(model, layers, weights, student)
            self.train_result = self._fine_tune(student, hooks=pruner, checkpoint_tag=checkpoint_tag)
            plan = pruner.final_plan()
            student.cpu()  # trained on CUDA perhaps; everything after runs on the CPU
            recalibration.fold()
        student.cpu()
        del pruner  # its importance scores and per-weight masks (a float each) are not needed past the plan
        release_freed_memory()
        plan.apply(weights)
        self.student = student
        self.kept_dense: dict[str, str] = {}
        self.depthwise_sparse: dict[str, str] = {}  # depthwise Convs run as SparseConv beside the pruned layers
        if self.keep_masked_dense:
            trained = self.masked_dense = write_back(model, student)
            pruned = rewrite_model(trained, plan.layer_patterns(), sparse=plan.sparse, kept_dense=self.kept_dense,
                                   threads=self.latency_threads, check_pattern_speed=True,
                                   depthwise=self.depthwise_sparse)
        else:
            # No second copy of the pruned layers' weights: the opset upgrade runs on the graph before the trained
            # weights go in, the pruned layers' weights stay in the module (the rewrite reads them from there and
            # writes only their compact forms), and the rewrite edits that model in place; the result is copied
            # out of its arena, which still holds what the rewrite dropped.
            from ctprune.graph.writeback import trained_tensors
            from ctprune.rewrite.upgrade import upgraded

            values = trained_tensors(student)
            pruned_ids = {id(w) for w in weights.values()}  # weights are keyed by layer; the model by tensor name
            held = {n: values[n] for n, p in student.onnx_parameters().items() if id(p) in pruned_ids}
            trained = write_back(upgraded(model), student, tensors=values, hold=held)
            del values
            rewritten = rewrite_model(trained, plan.layer_patterns(), sparse=plan.sparse, kept_dense=self.kept_dense,
                                      threads=self.latency_threads, in_place=True, held=held,
                                      check_pattern_speed=True, depthwise=self.depthwise_sparse)
            del held
            pruned = onnx.ModelProto()
            pruned.CopyFrom(rewritten)
            del trained, rewritten
            release_freed_memory()
        self._finished = True
        return pruned, {"kind": "pattern", "plan": plan}

    def _student(self, model):
        """The module that is pruned. At --epochs 0 with no eval data the teacher is read only before pruning
        (the class count), so the lifted teacher itself is pruned instead of a second copy of every weight."""
        if self._epochs() == 0 and self.eval_set is None and model is self.original and self.teacher is not None:
            student, self.teacher = self.teacher, None
            return student
        return self._lift(model)

    def _recalibration(self, model, layers, weights, student):
        """Training-time BatchNorm after each pruned Conv whose BN was folded at export (see recalibrate.py)."""
        from ctprune.pruning.recalibrate import FoldedBNRecalibration

        from ctprune.graph.layers import layer_key

        op_of = {layer_key(n): n.op_type for n in model.graph.node}
        params = student.onnx_parameters()
        convs = {}
        for layer in layers:
            if layer.node_name not in weights or not layer.bias_name or layer.bias_name not in params:
                continue
            if any(op_of.get(c) == "BatchNormalization" for c in layer.consumers):
                continue
            convs[layer.node_name] = (weights[layer.node_name], params[layer.bias_name])
        x = torch.from_numpy(self.train_set.x[: self.batch_size * 4])
        return FoldedBNRecalibration(student, convs, torch.split(x, self.batch_size))

    def _calibrate(self, pruner, student) -> None:
        """--epochs 0: importance (w * dL/dw)^2 from a few batches. L is cross-entropy against the labels, else
        against the dense model's own top-1 (a distillation loss would be exactly flat: the student is the teacher)."""
        import torch.nn.functional as F

        n = self.batch_size * CALIBRATION_BATCHES
        x = torch.from_numpy(self.train_set.x[:n])
        y = torch.from_numpy(self.train_set.y[:n]) if self.train_set.y is not None else None
        student.eval()  # importance of the model as deployed; BN stats stay as they are
        batches = [(x[i:i + self.batch_size], None if y is None else y[i:i + self.batch_size])
                   for i in range(0, len(x), self.batch_size)]

        def loss(batch):
            inputs, labels = batch
            out = _first(student(inputs))
            if labels is None:
                labels = out.detach().argmax(1)
            return F.cross_entropy(out.reshape(out.shape[0], out.shape[1], -1).squeeze(-1), labels)

        pruner.calibrate(loss, batches)

    def _precrop(self, ratio=None):
        """PreCropping: PAI densities → channel groups → crop → fine-tune (or train from scratch)."""
        from ctprune.graph import write_back
        from ctprune.pruning.precrop import apply_crop, plan_crop

        ratio = ratio or self.ratio
        sample = self.train_set.x[: min(len(self.train_set), 64)]
        plan = plan_crop(self.original, ratio, pai=self.pai, data=sample, channel_multiple=self.channel_multiple,
                         pretrained=self.init == "pretrained", seed=self.seed, drop_branches=self.drop_branches)
        # The kept channels get back the dense model's output statistics (restore.py), measured on the training
        # images; not on synthetic inputs (their statistics are not the data's) nor for weights re-initialised anyway.
        restore = self.data is not None and self.init == "pretrained"
        cropped = apply_crop(self.original, plan, data=self.train_set.x if restore else None)
        student = self._lift(cropped)
        if self.init == "scratch":
            _reinitialise(student, self.seed)
        self.train_result = None
        if self._epochs() > 0:
            self.train_result = self._fine_tune(student, checkpoint_tag="precrop" if self.method == "both" else "",
                                                lr=self.lr or DEFAULT_LR[self.init])
        student.cpu()
        self.student = student
        trained = write_back(cropped, student)
        self._finished = True
        return trained, {"kind": "precrop", "plan": plan}

    def _both(self):
        """Crop channels first, then prune what remains as auto does; the two ratios multiply to the target."""
        floor = 1.0 + 1e-3
        if self.ratio <= floor * floor:
            raise RatioError("--method both needs a ratio above 1x: cropping and pruning each take a share of it.")
        crop_ratio = math.sqrt(self.ratio)
        cropped, crop_report = self._precrop(ratio=crop_ratio)
        before = self._prunable_weights(self.original)
        after_crop = self._prunable_weights(cropped)
        pattern_ratio = max(floor, self.ratio * after_crop / before) if after_crop else floor
        self.notes.append(f"both: channels cropped {crop_report['plan'].ratio_achieved:.2f}x, then "
                          f"{pattern_ratio:.2f}x over the cropped model's prunable layers")
        pruned, pattern_report = self._pattern(cropped, pattern_ratio, checkpoint_tag="pattern")
        pattern_report["crop_plan"] = crop_report["plan"]
        pattern_report["kind"] = "both"
        pattern_report["prunable_before"] = before
        return pruned, pattern_report

    def _prunable_weights(self, model) -> int:
        """Weights of the layers auto would prune in `model` (their stored shapes; no training state needed)."""
        student = self._lift(model)
        _, decision = self._decide(model, student)
        return sum(p.numel() for p in decision.weights.values())

    # ---- report ---------------------------------------------------------------------------------------------------
    def _report(self, pruned: onnx.ModelProto, plan_report: dict) -> dict:
        from ctprune.report.build import build_report, conv_weights
        from ctprune.runtime.bench import latency_ms

        plan = plan_report["plan"]
        extra = {}
        if plan_report["kind"] == "precrop":  # weights counted on the two models; the crop's own settings
            extra = {"weights": {"before": conv_weights(self.original), "after": conv_weights(pruned)},
                     "pai": self.pai, "init": self.init}
        elif plan_report["kind"] == "both":  # the ratio is over the original model's prunable layers
            extra = {"weights": {"before": plan_report["prunable_before"]}}
        if plan_report["kind"] != "precrop":
            extra["patterns"] = plan.library.to_list()
            if self.block > 1:
                extra["block"] = self.block
        accuracy, agreement = self._evaluate(pruned, plan_report)
        self.student = self.teacher = None  # the latency step's sessions load the weights again: free the modules
        release_freed_memory()
        return build_report(
            self.original, pruned, plan, ratio=self.ratio, method=self.method,
            kept_dense=getattr(self, "kept_dense", {}), run_as_sparse=getattr(self, "depthwise_sparse", {}),
            notes=self.notes, allocation=None if plan_report["kind"] == "precrop" else self.allocation,
            accuracy=accuracy, agreement=agreement,
            latency_ms=latency_ms(self._model_path() or self.original, pruned, threads=self.latency_threads,
                                  batch=1),
            train=self._train_report(), **extra)

    def _model_path(self):
        """The input model's file when it came from one: onnxruntime then reads it (and its external data) itself,
        without a serialized copy of every weight in memory."""
        return self.model if isinstance(self.model, (str, os.PathLike)) else None

    def _evaluate(self, pruned: onnx.ModelProto, plan_report: dict):
        """Accuracy before/after and top-1 agreement on eval data, with the pruned model run in onnxruntime."""
        session = _session(pruned)
        x = self.eval_set.x if self.eval_set is not None else self.train_set.x[:CHECK_SAMPLES]
        pruned_out = _run_batched(session, x)
        step = _fixed_batch(session) or min(len(x), 256)
        # The deployed model must be the trained one: its outputs equal the lifted student's.
        ref = _torch_batched(self.student, x[: max(step, min(len(x), 64))], step)
        n = len(ref)
        # relative to the output's scale, which may be ~0 where a sigmoid saturates (a pruned detector on noise)
        err = float(np.abs(pruned_out[:n] - ref).max() / max(np.abs(ref).max(), 1e-6))
        if err > 1e-3:
            raise RuntimeError(f"internal error: the pruned ONNX model disagrees with the trained module ({err:.2e})")
        if self.eval_set is None:
            return None, None
        t_pred = _torch_batched(self.teacher, x, step).reshape(len(x), -1).argmax(1)
        p_pred = pruned_out.reshape(len(x), -1).argmax(1)
        agreement = float((t_pred == p_pred).mean())
        self._warn_if_one_answer(t_pred, p_pred)
        if self.eval_set.y is not None:
            y = self.eval_set.y
            return {"before": float((t_pred == y).mean()), "after": float((p_pred == y).mean())}, agreement
        return None, agreement

    def _warn_if_one_answer(self, dense_pred: np.ndarray, pruned_pred: np.ndarray) -> None:
        """A pruned model that gives one answer for every evaluation input while the dense model gives several has
        lost its function (e.g. a crop that pushed every activation below a ReLU's floor): say so in the log and
        the report rather than ship it silently."""
        if len(np.unique(pruned_pred)) == 1 and len(np.unique(dense_pred)) > 1:
            note = (f"warning: the pruned model predicts class {int(pruned_pred[0])} for every one of the "
                    f"{len(pruned_pred)} evaluation inputs (the dense model does not): it has lost its function; "
                    "try a lower ratio or another --method")
            log.warning("%s", note)
            self.notes.append(note)

    def _train_report(self) -> dict:
        from ctprune.train import resolve_device

        if self.train_result is not None:
            return self.train_result.report()
        return {"epochs": 0, "seconds": 0.0, "backend": self.backend, "device": str(resolve_device(self.device))}


# ---- small helpers ----------------------------------------------------------------------------------------------------
def _fixed_batch(session) -> int | None:
    shape = session.get_inputs()[0].shape
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None


def _torch_batched(module, x: np.ndarray, step: int) -> np.ndarray:
    """First output of the lifted `module` (eval mode, no grad) over x in chunks of `step` (padded to a full chunk)."""
    module.eval()
    outputs = []
    with torch.no_grad():
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            padded = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            outputs.append(_first(module(torch.from_numpy(padded))).cpu().numpy()[: len(chunk)])
    return np.concatenate(outputs)


def _run_batched(session, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """First output over all of x, in batches (of the model's own batch size when that is fixed)."""
    first = session.get_inputs()[0]
    fixed = _fixed_batch(session)
    step = fixed or batch
    outputs = []
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        if fixed and len(chunk) < fixed:  # pad the last chunk up to the fixed batch, then drop the padding
            pad = np.zeros((fixed - len(chunk), *chunk.shape[1:]), dtype=chunk.dtype)
            outputs.append(session.run(None, {first.name: np.concatenate([chunk, pad])})[0][: len(chunk)])
        else:
            outputs.append(session.run(None, {first.name: chunk})[0])
    return np.concatenate(outputs)


def _session(model: onnx.ModelProto):
    """onnxruntime session with ctprune's kernels when the library is built, else the model's reference functions."""
    import onnxruntime as ort

    from ctprune.errors import CtpruneError
    from ctprune.runtime import InferenceSession

    try:
        return InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except CtpruneError as err:
        log.warning("%s", err)
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _ints(text, what):
    if text is None or isinstance(text, (tuple, list)):
        return text
    try:
        return tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise DataError(f"{what} {text!r} is not a comma-separated list of integers (e.g. 224,224).") from None


def _floats(text, what):
    if text is None or isinstance(text, (tuple, list)):
        return text
    try:
        return tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise DataError(f"{what} {text!r} is not a comma-separated list of numbers (e.g. 0.485,0.456,0.406).") from None


def _reinitialise(module: torch.nn.Module, seed: int) -> None:
    """--init scratch: fresh Kaiming weights for Conv/Gemm, BN at identity (the paper's from-scratch setting)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.onnx_parameters().items():
            if p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2.0 / fan_in))
            elif p.dim() == 1:
                pass  # biases and BN affine keep their values; BN statistics are re-estimated in training
