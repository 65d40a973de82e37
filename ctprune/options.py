"""Every option of a pruning run, declared once: the CLI's flags, `ctprune.prune()`'s keywords and the pipeline's
settings all come from `PruneOptions` (a field's metadata holds its command-line help, choices and range).

    options = PruneOptions(method="auto", epochs=0)       # the API and the pipeline
    options.setting_values()                             # what a resumed run must repeat (checkpoint check)
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field

METHODS = ("auto", "pattern", "precrop", "both")
ALLOCATIONS = ("importance", "balanced", "macs")
PAI_METHODS = ("synflow", "synflow-macs", "snip", "grasp", "erk", "uniform")
BLOCK_SIZES = (1, 4, 8, 16)  # filters per block of a pattern layer (ctprune/pruning/blocks.py)


def _opt(help: str, *, choices=None, min=None, max=None, flag: bool = False, type=None, show_default: bool = True,
         setting: bool = True, cli: bool = True, flag_names: tuple[str, str] | None = None) -> dict:
    """A field's metadata: `setting`: a resumed run must repeat it; `cli`: offered as a flag."""
    return {"help": help, "choices": choices, "min": min, "max": max, "flag": flag, "type": type,
            "show_default": show_default, "setting": setting, "cli": cli, "flag_names": flag_names}


@dataclass
class PruneOptions:
    method: str = field(default="auto", metadata=_opt(
        "auto: patterns on 3x3 Convs, sparse blocks on 1x1/kxk Convs and FC layers; pattern: 3x3 Convs only "
        "(ClickTrain); precrop: PreCropping channels (standard ONNX ops); both: crop, then prune as auto.",
        choices=METHODS))
    prune_head: bool = field(default=False, metadata=_opt(
        "Also prune the FC layer whose output is the model's output (the classifier).", flag=True))
    data: object = field(default=None, metadata=_opt(
        "Training data: .npz with x (and optional y), or an image folder with class sub-folders.", show_default=False))
    eval_data: object = field(default=None, metadata=_opt("Evaluation data, same formats as --data.",
                                                          show_default=False))
    epochs: int | None = field(default=None, metadata=_opt(
        "Fine-tuning epochs (0: prune by importance without training) [default: 3].", type=int, min=0,
        show_default=False))
    batch_size: int = field(default=64, metadata=_opt("Training batch size.", type=int, min=1))
    lr: float | None = field(default=None, metadata=_opt("Learning rate [default: by method].", type=float,
                                                         min=0.0, show_default=False))
    patterns: int = field(default=8, metadata=_opt("Size of the pattern library.", type=int, min=1, max=126))
    block: int = field(default=1, metadata=_opt(
        "3x3 pattern layers: filters in blocks of N similar ones that keep the same input channels with the same "
        "pattern each (PatternConv computes such a block together); 1: every filter chooses alone.",
        choices=BLOCK_SIZES, type=int))
    allocation: str = field(default="balanced", metadata=_opt(
        "How the budget is split between layers: by importance per square root of multiply-adds per weight "
        "(balanced); per multiply-add (macs: prunes high-resolution layers even more, faster, usually less "
        "accurate); or by importance alone (keeps early high-resolution layers, slower models).",
        choices=ALLOCATIONS))
    device: str = field(default="auto", metadata=_opt("Where to fine-tune.", choices=("auto", "cpu", "cuda"),
                                                      setting=False))
    backend: str = field(default="torch", metadata=_opt("Training backend.", choices=("torch", "ortmodule"),
                                                        setting=False))
    seed: int = field(default=0, metadata=_opt("Random seed.", type=int))
    resume: bool = field(default=False, metadata=_opt("Continue an interrupted run from its checkpoint.", flag=True,
                                                      setting=False))
    quiet: bool = field(default=False, metadata=_opt("No progress bars or table.", flag=True, setting=False))
    pai: str = field(default="synflow-macs", metadata=_opt(
        "precrop: layer-wise densities from this pruning-at-initialization method (synflow-macs: SynFlow's, with "
        "MACs cut at least as much as weights).", choices=PAI_METHODS))
    init: str = field(default="pretrained", metadata=_opt(
        "precrop: fine-tune the kept weights, or re-initialise and train from scratch.",
        choices=("pretrained", "scratch")))
    channel_multiple: int = field(default=8, metadata=_opt(
        "precrop: kept channel counts are rounded to a multiple of this.", type=int, min=1))
    drop_branches: bool = field(default=True, metadata=_opt(
        "precrop with synflow/snip/grasp: drop residual branches the densities keep (almost) nothing of.",
        flag=True, flag_names=("--drop-branches", "--keep-branches")))
    input_size: object = field(default=None, metadata=_opt("Image folders: H,W to resize to.", show_default=False))
    mean: object = field(default=None, metadata=_opt("Image folders: per-channel mean, comma-separated.",
                                                     show_default=False))
    std: object = field(default=None, metadata=_opt("Image folders: per-channel std, comma-separated.",
                                                    show_default=False))
    # Python API only
    first_conv_dense: bool = field(default=True, metadata=_opt("Keep the network's first Conv dense.", cli=False))
    latency_threads: int = field(default=1, metadata=_opt("Threads of the report's latency measurement.", cli=False,
                                                          setting=False))
    schedule: str = field(default="clicktrain", metadata=_opt(
        "\"oneshot\": the prune-after baseline (magnitude masks fixed before fine-tuning), for comparisons.",
        choices=("clicktrain", "oneshot"), cli=False))

    def __post_init__(self):
        from ctprune.errors import CtpruneError

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            # a whole number must be one, not a string, float or bool that compares equal to one
            wrong_kind = f.metadata.get("type") is int and (isinstance(value, bool)
                                                            or not isinstance(value, numbers.Integral))
            if choices and (wrong_kind or value not in choices):
                raise CtpruneError(f"{f.name} {value!r} is not one of {', '.join(map(str, choices))}.")
            if choices and f.metadata.get("type") is int:
                setattr(self, f.name, int(value))

    def setting_values(self) -> dict:
        """The options a resumed run must repeat, by name (data sources and runtime knobs excluded)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("setting") and f.name not in ("data", "eval_data")}

    @classmethod
    def cli_fields(cls):
        return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]
