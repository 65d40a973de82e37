"""Training: fine-tune a lifted ONNX graph by distilling the dense model, with pruning hooks, checkpoints and DDP.

    from ctprune.train import fine_tune, evaluate, load_data, synthetic_data, TrainHooks
"""

from ctprune.train.data import Dataset, load_data, synthetic_data
from ctprune.train.evaluation import evaluate, resolve_device
from ctprune.train.hooks import TrainHooks
from ctprune.train.loop import TrainResult, fine_tune

__all__ = ["Dataset", "load_data", "synthetic_data", "TrainHooks", "TrainResult", "fine_tune", "evaluate",
           "resolve_device"]
