"""Running ctprune's models in onnxruntime with ctprune's kernels registered.

A model ctprune writes runs in any onnxruntime: its PatternConv nodes carry a model-local function in standard ops.
With ctprune's custom-op library registered, onnxruntime runs the library's kernels for them instead, which is what
makes the pruned model fast:

    sess = ctprune.InferenceSession("model.ctprune.onnx")
    so = ctprune.runtime.session_options(threads=2)        # or register the library in your own options:
    so.register_custom_ops_library(ctprune.kernel_library_path())
"""

from __future__ import annotations

import os
import pathlib
import threading
import weakref
from typing import Optional, Sequence, Union

import onnx
import onnxruntime as ort

from ctprune.errors import CtpruneError

LIBRARY_DIR = pathlib.Path(__file__).resolve().parent.parent / "_lib"
LIBRARY_STEM = "libctprune_ops"
LIBRARY_ENV = "CTPRUNE_KERNEL_LIBRARY"  # use this library file instead of the package's own (e.g. a custom build)


def kernel_library_path() -> str:
    """Absolute path of the compiled custom-op library: $CTPRUNE_KERNEL_LIBRARY if set, else the one in the package."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        if not os.path.isfile(override):
            raise CtpruneError(f"{LIBRARY_ENV}={override} is not a file")
        return os.path.abspath(override)
    found = sorted(p for p in LIBRARY_DIR.glob(LIBRARY_STEM + "*") if p.suffix in (".so", ".dylib", ".dll"))
    if not found:
        raise CtpruneError(
            f"ctprune's kernel library ({LIBRARY_STEM}*.so) is not built: nothing in {LIBRARY_DIR}. Build it with "
            "`pip install -e .` (or `make setup`) in the ctprune source tree; it needs onnxruntime's C headers "
            "(set ORT_INCLUDE_DIR, or let scripts/fetch_ort_headers.sh fetch them). Without it, models still run "
            "in plain onnxruntime through their reference functions, only slowly."
        )
    if len(found) > 1:
        # several builds (e.g. an old and a new Python ABI tag): the newest file is the one a rebuild just wrote
        found.sort(key=lambda p: p.stat().st_mtime)
    return str(found[-1])


# options ctprune already registered its library in: onnxruntime refuses a session whose options load it twice.
# The lock makes check-and-register one step, so threads sharing one SessionOptions register it exactly once.
_registered: "weakref.WeakSet[ort.SessionOptions]" = weakref.WeakSet()
_registering = threading.Lock()


def register_kernels(options: ort.SessionOptions) -> ort.SessionOptions:
    """Register ctprune's custom-op library in `options` (in place, once per options object, thread-safe); return it.

    The only change made to `options` is that registration: the same object can build any number of sessions,
    with ctprune.InferenceSession or plain onnxruntime, from any number of threads."""
    with _registering:
        if options in _registered:
            return options
        path = kernel_library_path()
        try:
            options.register_custom_ops_library(path)
        except Exception as err:  # e.g. built for a newer onnxruntime API than the one installed
            raise CtpruneError(
                f"onnxruntime {ort.__version__} could not load ctprune's kernel library {path}: {err}. "
                "It needs onnxruntime >= 1.21 (the version of the headers it was built against)."
            ) from err
        _registered.add(options)
    return options


def session_options(threads: Optional[int] = None) -> ort.SessionOptions:
    """New SessionOptions with ctprune's kernels registered; `threads` sets intra_op_num_threads (None: onnxruntime's default)."""
    options = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise CtpruneError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = int(threads)
    return register_kernels(options)


def default_providers() -> list[str]:
    """CUDA when this onnxruntime has it, then CPU (onnxruntime >= 1.9 wants the list spelt out)."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class InferenceSession(ort.InferenceSession):
    """An onnxruntime.InferenceSession with ctprune's kernels registered.

    `path_or_bytes`: a file path, serialized model bytes or an onnx.ModelProto. `sess_options`: your own options, in
    which the library is registered (in place, unless ctprune.runtime already did); default: fresh options. `providers`: default CUDA (if present), CPU.
    Everything else goes to onnxruntime.InferenceSession unchanged.
    """

    def __init__(
        self,
        path_or_bytes: Union[str, os.PathLike, bytes, onnx.ModelProto],
        sess_options: Optional[ort.SessionOptions] = None,
        providers: Optional[Sequence] = None,
        **kwargs,
    ):
        if isinstance(path_or_bytes, onnx.ModelProto):
            path_or_bytes = path_or_bytes.SerializeToString()
        elif isinstance(path_or_bytes, os.PathLike):
            path_or_bytes = os.fspath(path_or_bytes)
        options = register_kernels(sess_options if sess_options is not None else ort.SessionOptions())
        try:
            super().__init__(path_or_bytes, sess_options=options, providers=providers or default_providers(), **kwargs)
        except Exception as err:
            if "Domain already set" in str(err):
                raise CtpruneError(
                    "these SessionOptions already had ctprune's kernel library registered by hand; pass them to "
                    "onnxruntime.InferenceSession directly, or let ctprune.InferenceSession register it"
                ) from err
            raise
