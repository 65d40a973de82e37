"""ctprune: ONNX-to-ONNX CNN compression with ClickTrain pattern pruning, PreCropping and fast PatternConv kernels.

    import ctprune
    result = ctprune.prune("model.onnx", ratio=8)
    result.save("model.ctprune.onnx")
    sess = ctprune.InferenceSession("model.ctprune.onnx")
"""

from ctprune.errors import CtpruneError

__version__ = "0.1.0"

__all__ = ["prune", "PruneResult", "InferenceSession", "kernel_library_path", "CtpruneError", "__version__"]


def __getattr__(name):
    # Lazy: `import ctprune` stays cheap (no torch import) for the CLI's --help and for inference-only users.
    if name in ("prune", "PruneResult"):
        from ctprune import api

        return getattr(api, name)
    if name in ("InferenceSession", "kernel_library_path"):
        from ctprune.runtime import session as runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'ctprune' has no attribute {name!r}")
