"""SparseConv's CUDA kernels built on machines without a GPU: nvcc compiles them with warnings as errors and no register
spills, the standalone library exports the C ABI, loads, names bad layers before any CUDA call and reports the missing
GPU as a CUDA error instead of crashing; the onnxruntime op compiles against the CUDA headers (tests/test_cuda_build.py
links the whole CUDA-enabled library with it)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
NVCC = shutil.which("nvcc")
ORT_INCLUDE = Path(os.environ.get("ORT_INCLUDE_DIR", REPO / ".deps" / "onnxruntime" / "include" / "onnxruntime"))
INSTANCES = [f"{kind}ILi{block}E" for kind in ("SparseConvKernel", "SparseFcKernel") for block in (1, 2, 4, 8)]
C_ABI = ["ctprune_sparse_conv_cuda", "ctprune_sparse_conv_cuda_prepare", "ctprune_sparse_conv_cuda_release",
         "ctprune_sparse_conv_cuda_output_size", "ctprune_sparse_conv_cuda_status_string"]

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA toolkit is not installed here")


@pytest.fixture(scope="module")
def sparse_library(tmp_path_factory):
    """(standalone library, kernel object, ptxas report): nvcc of sparse_conv_impl.cu for sm_90 and the spec checks."""
    from ctprune.lab.cuda_sparse_harness import SPARSE_SPEC_SOURCES

    folder = tmp_path_factory.mktemp("sparse_nvcc")
    obj = folder / "sparse_conv_impl.o"
    out = subprocess.run([NVCC, "-c", str(CSRC / "cuda" / "sparse_conv_impl.cu"), "-o", str(obj), "-O3", "-std=c++17",
                          "-arch=sm_90", "-Xcompiler", "-fPIC", f"-I{CSRC}", "-Werror", "all-warnings", "-Xptxas",
                          "-v"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    objects = [obj]
    for source in SPARSE_SPEC_SOURCES:
        objects.append(folder / (Path(source).stem + ".o"))
        subprocess.run(["g++", "-c", str(CSRC / source), "-o", str(objects[-1]), "-O1", "-std=c++17", "-fPIC", "-Wall",
                        "-Werror", f"-I{CSRC}"], check=True, capture_output=True, text=True)
    lib = folder / "libsparse_conv_cuda.so"
    subprocess.run([NVCC, "-shared", "-o", str(lib)] + [str(p) for p in objects], check=True, capture_output=True,
                   text=True)
    return lib, obj, out.stdout + out.stderr


def test_nvcc_compiles_every_instance_without_spills(sparse_library):
    lib, obj, report = sparse_library
    raw = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
    for instance in INSTANCES:
        assert instance in raw, f"kernel instance {instance} missing"
    defined = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    for name in C_ABI:
        assert re.search(rf" T {name}\b", defined), f"{name} not exported"
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
    assert len(spills) >= len(INSTANCES) and max(spills) == 0, report


def test_c_abi_loads_and_reports_errors_without_crashing(sparse_library):
    import torch

    from ctprune.lab.cuda_harness import KernelCallError
    from ctprune.lab.cuda_sparse_harness import CudaSparseConv, random_sparse_layer

    lib = sparse_library[0]
    CudaSparseConv._lib = None
    try:
        rng = np.random.default_rng(0)
        bad = random_sparse_layer(rng, (8, 4, 3, 3), 2.0, 4)
        bad.compact = type(bad.compact)(**{**bad.compact.__dict__, "block_order": np.zeros_like(bad.compact.block_order)})
        with pytest.raises(KernelCallError, match="invalid SparseConv attributes: .*block_order"):
            CudaSparseConv(bad, lib)
        if not torch.cuda.is_available():
            with pytest.raises(KernelCallError, match="SparseConv kernel status"):
                CudaSparseConv(random_sparse_layer(rng, (8, 4, 3, 3), 2.0, 4), lib)
    finally:
        CudaSparseConv._lib = None


@pytest.mark.skipif(not (ORT_INCLUDE / "onnxruntime_c_api.h").exists(), reason="onnxruntime headers not fetched")
def test_onnxruntime_op_compiles_against_cuda_headers(tmp_path):
    from test_cuda_build import cuda_include

    flags = ["-std=c++17", "-Wall", "-Werror", "-fPIC", "-DCTPRUNE_WITH_CUDA", f"-I{CSRC}", f"-I{ORT_INCLUDE}",
             f"-I{ORT_INCLUDE.parent}", f"-I{cuda_include()}"]
    obj = tmp_path / "sparse_conv_op.o"
    subprocess.run(["g++", "-c", str(CSRC / "cuda" / "sparse_conv_op.cc"), "-o", str(obj), "-O1"] + flags, check=True,
                   capture_output=True, text=True)
    defined = subprocess.run(["nm", "-C", "--defined-only", str(obj)], capture_output=True, text=True).stdout
    assert "ctprune::cuda::SparseConvCudaKernel::SparseConvCudaKernel" in defined
