"""What the PatternConv and SparseConv CUDA harnesses share: building a kernel's standalone library (nvcc) and its CPU
emulator (g++), cached by source digest, and calling either through the C ABI both kernels follow.

The ABI of an op with symbol prefix ``p`` (``ctprune_pattern_conv``, ``ctprune_sparse_conv``):
- emulator: ``p_emulate(desc*, x, w, b, z, z size, y, <shape>..., <extra>..., err, err size)``;
- GPU: ``p_cuda_prepare(desc*, handle*, err, err size)``, ``p_cuda(handle, x, w, b, z, z size, y, <shape>..., stream,
  <extra>...)``, ``p_cuda_release(handle)``, ``p_cuda_status_string(status)``.
Every call returns 0 or a status; INVALID_ATTRIBUTES comes with a message in err.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

import numpy as np

log = logging.getLogger(__name__)

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"
INVALID_ATTRIBUTES, INVALID_SHAPE = -1, -2


class KernelCallError(RuntimeError):
    """The kernel library returned a non-zero status (the message names it)."""


def source_digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(pathlib.Path(p).read_bytes())
    return h.hexdigest()[:16]


def cuda_sources(spec_sources) -> list[pathlib.Path]:
    """Every source of csrc/cuda, with the spec checks `spec_sources` (csrc-relative .cc) and their headers."""
    cuda = CSRC / "cuda"
    if not cuda.is_dir():
        raise FileNotFoundError(f"kernel sources not found at {cuda}: the harness needs a source checkout")
    spec = [CSRC / name for name in spec_sources] + [(CSRC / name).with_suffix(".h") for name in spec_sources]
    return sorted(list(cuda.glob("*.h")) + list(cuda.glob("*.cuh")) + list(cuda.glob("*.cc")) + list(cuda.glob("*.cu"))
                  + spec)


def _build(out: pathlib.Path, command: list[str]) -> pathlib.Path:
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    log.info("building %s", out.name)
    subprocess.run(command + ["-o", str(tmp)], check=True, capture_output=True, text=True)
    os.replace(tmp, out)  # atomic: parallel test workers may build at once
    return out


def default_build_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("CTPRUNE_KERNEL_BUILD_DIR", tempfile.gettempdir())) / "ctprune-kernels"


def build_emulator_library(stem: str, spec_sources, digest_sources, build_dir: pathlib.Path | None) -> pathlib.Path:
    """g++ build of csrc/cuda/<stem>_emulate.cc with the spec checks, named by the digest of `digest_sources`."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise FileNotFoundError("no C++ compiler (g++) found")
    out = (build_dir or default_build_dir()) / f"{stem}_emulate-{source_digest(digest_sources)}.so"
    return _build(out, [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", f"-I{CSRC}",
                        str(CSRC / "cuda" / f"{stem}_emulate.cc")] + [str(CSRC / s) for s in spec_sources])


def build_cuda_library(stem: str, spec_sources, digest_sources, build_dir: pathlib.Path | None,
                       arch: str | None) -> pathlib.Path:
    """nvcc build of csrc/cuda/<stem>_impl.cu with the spec checks; arch like 'sm_90' (default: the current GPU's)."""
    nvcc = shutil.which("nvcc")
    if not nvcc:
        raise FileNotFoundError("nvcc not found on PATH")
    if arch is None:
        import torch

        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    out = (build_dir or default_build_dir()) / f"{stem}_cuda-{arch}-{source_digest(digest_sources)}.so"
    return _build(out, [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-arch={arch}", f"-I{CSRC}",
                        str(CSRC / "cuda" / f"{stem}_impl.cu")]  # cudart linked statically (nvcc default)
                  + [str(CSRC / s) for s in spec_sources])


def kernel_error(op: str, prefix: str, status: int, lib, err: ctypes.Array | None = None) -> KernelCallError:
    if status == INVALID_ATTRIBUTES and err is not None:
        return KernelCallError(f"invalid {op} attributes: {err.value.decode()}")
    status_string = getattr(lib, f"{prefix}_cuda_status_string", None)
    if status_string is not None:
        return KernelCallError(f"{op} kernel status {status}: {status_string(status).decode()}")
    return KernelCallError(f"{op} emulator status {status}")


def _io_argtypes(shape_args: int) -> list:
    """x, w, b, z, z size, y, then the input's shape."""
    return [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * shape_args


class Emulator:
    """A kernel's CPU emulator library: `run` calls <prefix>_emulate on float32 numpy arrays."""

    def __init__(self, path: pathlib.Path, op: str, prefix: str, desc_type, shape_args: int, extra_argtypes=()):
        self.lib = ctypes.CDLL(str(path))
        self.op, self.prefix = op, prefix
        self.emulate = getattr(self.lib, f"{prefix}_emulate")
        self.emulate.restype = ctypes.c_int
        self.emulate.argtypes = ([ctypes.POINTER(desc_type)] + _io_argtypes(shape_args) + list(extra_argtypes)
                                 + [ctypes.c_char_p, ctypes.c_int])

    def run(self, layer, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, z: np.ndarray | None, y: np.ndarray,
            *args) -> None:
        """y = the op on x (all contiguous float32); args: the input's shape, then the extra arguments."""
        err = ctypes.create_string_buffer(512)
        desc = layer.desc()
        status = self.emulate(
            ctypes.byref(desc), x.ctypes.data, w.ctypes.data, None if bias is None else bias.ctypes.data,
            None if z is None else z.ctypes.data, 0 if z is None else z.size, y.ctypes.data, *args, err, len(err))
        if status != 0:
            raise kernel_error(self.op, self.prefix, status, self.lib, err)


class PreparedCudaKernel:
    """A GPU kernel prepared for one layer on the current CUDA device, called on torch CUDA tensors.

    A subclass names OP, PREFIX, DESC (the layer's ctypes struct), SHAPE_ARGS and EXTRA_ARGTYPES (after the stream),
    and build_library (its nvcc build)."""

    OP = PREFIX = ""
    DESC = None
    SHAPE_ARGS = 0
    EXTRA_ARGTYPES: tuple = ()
    _lib = None

    @staticmethod
    def build_library() -> pathlib.Path:
        raise NotImplementedError

    @classmethod
    def library(cls, path: pathlib.Path | None = None):
        if cls._lib is None:
            lib = ctypes.CDLL(str(path or cls.build_library()))
            prepare = getattr(lib, f"{cls.PREFIX}_cuda_prepare")
            prepare.restype = ctypes.c_int
            prepare.argtypes = [ctypes.POINTER(cls.DESC), ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p,
                                ctypes.c_int]
            call = getattr(lib, f"{cls.PREFIX}_cuda")
            call.restype = ctypes.c_int
            call.argtypes = [ctypes.c_void_p] + _io_argtypes(cls.SHAPE_ARGS) + [ctypes.c_void_p] + list(
                cls.EXTRA_ARGTYPES)
            release = getattr(lib, f"{cls.PREFIX}_cuda_release")
            release.restype = None
            release.argtypes = [ctypes.c_void_p]
            status_string = getattr(lib, f"{cls.PREFIX}_cuda_status_string")
            status_string.restype = ctypes.c_char_p
            status_string.argtypes = [ctypes.c_int]
            cls._lib = lib
        return cls._lib

    def __init__(self, layer, library: pathlib.Path | None = None):
        self.lib = self.library(library)
        self.layer = layer
        self.handle = ctypes.c_void_p()
        err = ctypes.create_string_buffer(512)
        desc = layer.desc()
        status = getattr(self.lib, f"{self.PREFIX}_cuda_prepare")(ctypes.byref(desc), ctypes.byref(self.handle), err,
                                                                    len(err))
        if status != 0:
            raise kernel_error(self.OP, self.PREFIX, status, self.lib, err)

    @staticmethod
    def check_tensors(**tensors) -> None:
        """ValueError unless every tensor given (not None) is a contiguous float32 torch CUDA tensor."""
        import torch

        for name, t in tensors.items():
            if t is not None and (t.dtype != torch.float32 or not t.is_cuda or not t.is_contiguous()):
                raise ValueError(f"{name} must be a contiguous float32 CUDA tensor, got {t.dtype} on {t.device}")

    def launch(self, x, w, b, z, out, shape, extra=()):
        """out = the op on x, on torch's current stream (tensors as check_tensors wants them; z None, one element or
        out's shape); shape: the input's shape arguments, extra: what follows the stream."""
        import torch

        status = getattr(self.lib, f"{self.PREFIX}_cuda")(
            self.handle, x.data_ptr(), w.data_ptr(), None if b is None else b.data_ptr(),
            None if z is None else z.data_ptr(), 0 if z is None else z.numel(), out.data_ptr(), *shape,
            torch.cuda.current_stream().cuda_stream, *extra)
        if status != 0:
            raise kernel_error(self.OP, self.PREFIX, status, self.lib)
        return out

    def close(self):
        if self.handle:
            getattr(self.lib, f"{self.PREFIX}_cuda_release")(self.handle)
            self.handle = ctypes.c_void_p()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to free
            pass
