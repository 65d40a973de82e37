"""Errors a user can cause and fix. The CLI prints their message (no traceback) and exits non-zero.

Everything else that escapes is a bug in ctprune and keeps its traceback.
"""

__all__ = [
    "CtpruneError",
    "ModelLoadError",
    "UnsupportedOpsError",
    "RatioError",
    "DataError",
    "GraphError",
    "BackendError",
    "Interrupted",
]


class CtpruneError(Exception):
    """Base class: a problem with the user's input or environment, explained in one paragraph."""

    exit_code = 2


class ModelLoadError(CtpruneError):
    """The model file is missing, is not ONNX, is truncated, or fails the checker."""


class UnsupportedOpsError(CtpruneError):
    """The graph holds ops ctprune cannot lift; the message names every op type and its nodes."""

    def __init__(self, unsupported: dict[str, list[str]]):
        self.unsupported = dict(unsupported)
        parts = []
        for op_type in sorted(unsupported):
            nodes = unsupported[op_type]
            shown = ", ".join(repr(n) for n in nodes[:8]) + (f" and {len(nodes) - 8} more" if len(nodes) > 8 else "")
            parts.append(f"{op_type} (nodes {shown})")
        super().__init__(
            f"the model uses {len(unsupported)} op type(s) ctprune does not support: " + "; ".join(parts) + "."
        )


class RatioError(CtpruneError):
    """The compression ratio is malformed or cannot be reached with the given settings."""


class DataError(CtpruneError):
    """Training or evaluation data is missing, malformed, or does not fit the model's input."""


class GraphError(CtpruneError):
    """The graph has a structure ctprune cannot transform (names the nodes involved)."""


class BackendError(CtpruneError):
    """A requested training backend or device is not available here."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped a run that left a checkpoint; the message says where and how to resume."""
