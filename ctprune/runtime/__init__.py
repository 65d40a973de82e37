"""Running ctprune's models: onnxruntime sessions with ctprune's kernels (session.py) and latency measurement (bench.py)."""

from ctprune.runtime.session import (
    LIBRARY_ENV,
    InferenceSession,
    default_providers,
    kernel_library_path,
    register_kernels,
    session_options,
)

__all__ = ["InferenceSession", "kernel_library_path", "register_kernels", "session_options", "default_providers",
           "LIBRARY_ENV"]
