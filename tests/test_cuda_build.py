"""The CUDA build, checked on machines without a GPU: nvcc compiles the kernel, g++ compiles the onnxruntime op against
the CUDA headers, setup.py's switch behaves, and the CPU-only library does not depend on CUDA.

The full CUDA library build (every CPU source plus nvcc, minutes on a 2-core machine) runs only with
CTPRUNE_TEST_CUDA_BUILD=1."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
NVCC = shutil.which("nvcc")
ORT_INCLUDE = Path(os.environ.get("ORT_INCLUDE_DIR", REPO / ".deps" / "onnxruntime" / "include" / "onnxruntime"))

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA toolkit is not installed here")
needs_ort_headers = pytest.mark.skipif(not (ORT_INCLUDE / "onnxruntime_c_api.h").exists(),
                                       reason="onnxruntime headers not fetched (scripts/fetch_ort_headers.sh)")
KERNEL_INSTANCES = ["ILi1ELi1E", "ILi1ELi2E", "ILi1ELi4E", "ILi2ELi1E", "ILi2ELi2E", "ILi2ELi4E", "ILi4ELi1E",
                    "ILi4ELi2E", "ILi4ELi4E"]
C_ABI = ["ctprune_pattern_conv_cuda", "ctprune_pattern_conv_cuda_prepare", "ctprune_pattern_conv_cuda_release",
         "ctprune_pattern_conv_cuda_output_size", "ctprune_pattern_conv_cuda_status_string"]


def cuda_include() -> str:
    out = subprocess.run([NVCC, "--dryrun", "-c", "x.cu"], capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ INCLUDES="):
            return shlex.split(line.split("=", 1)[1])[0][2:]
    pytest.fail("nvcc --dryrun names no include dir")


def symbols(path: Path, *flags) -> str:
    return subprocess.run(["nm", "-C", *flags, str(path)], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def kernel_object(tmp_path_factory):
    """nvcc -c of the kernel for sm_90 (warnings are errors); (object path, ptxas report)."""
    obj = tmp_path_factory.mktemp("nvcc") / "pattern_conv_impl.o"
    out = subprocess.run([NVCC, "-c", str(CSRC / "cuda" / "pattern_conv_impl.cu"), "-o", str(obj), "-O3", "-std=c++17",
                          "-arch=sm_90", "-Xcompiler", "-fPIC", f"-I{CSRC}", "-Werror", "all-warnings", "-Xptxas", "-v"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return obj, out.stdout + out.stderr


@needs_nvcc
def test_nvcc_compiles_the_kernel(kernel_object):
    obj, _ = kernel_object
    defined = symbols(obj, "--defined-only")
    for name in C_ABI:
        assert re.search(rf" T {name}\b", defined), f"{name} not exported by the kernel object"
    raw = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
    for instance in KERNEL_INSTANCES:  # every (filters, pixels) per thread the dispatcher names
        assert f"PatternConvKernel{instance}" in raw, f"kernel instance {instance} missing"


@needs_nvcc
def test_kernel_keeps_accumulators_in_registers(kernel_object):
    # Spilled accumulators would go through local memory; ptxas reports spills per instance.
    _, report = kernel_object
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
    assert len(spills) == len(KERNEL_INSTANCES), report
    assert max(spills) == 0, f"spills: {spills}"


@needs_nvcc
@needs_ort_headers
def test_onnxruntime_op_compiles_against_cuda_headers(tmp_path):
    flags = ["-std=c++17", "-Wall", "-Werror", "-fPIC", "-DCTPRUNE_WITH_CUDA", f"-I{CSRC}", f"-I{ORT_INCLUDE}",
             f"-I{ORT_INCLUDE.parent}", f"-I{cuda_include()}"]
    obj = tmp_path / "op.o"
    subprocess.run(["g++", "-c", str(CSRC / "cuda" / "pattern_conv_cuda_op.cc"), "-o", str(obj), "-O1"] + flags,
                   check=True, capture_output=True, text=True)
    defined = symbols(obj, "--defined-only")
    assert "ctprune::cuda::RegisterOps(Ort::CustomOpDomain&)" in defined
    # register.cc calls RegisterOps only in a CUDA build: it must compile both ways.
    for extra in ([], ["-UCTPRUNE_WITH_CUDA"]):
        subprocess.run(["g++", "-fsyntax-only", str(CSRC / "ops" / "register.cc")] + flags + extra,
                       check=True, capture_output=True, text=True)


def test_cuda_stays_off_unless_asked(tmp_path):
    # CTPRUNE_CUDA=1 without nvcc must fail with a clear message (before compiling anything) ...
    env = dict(os.environ, CTPRUNE_CUDA="1", PATH="/usr/bin:/bin", NVCC="")
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-temp", str(tmp_path / "t"),
                          "--build-lib", str(tmp_path / "l")], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "CTPRUNE_CUDA=1 but nvcc was not found" in out.stderr + out.stdout
    # ... and a bad value is named.
    env = dict(os.environ, CTPRUNE_CUDA="maybe")
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-temp", str(tmp_path / "t"),
                          "--build-lib", str(tmp_path / "l")], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "CTPRUNE_CUDA='maybe'" in out.stderr + out.stdout


def test_cpu_library_does_not_need_cuda():
    from ctprune.errors import CtpruneError
    from ctprune.runtime import kernel_library_path

    try:
        lib = Path(kernel_library_path())
    except CtpruneError as e:
        pytest.skip(f"kernel library not built: {e}")
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    if os.environ.get("CTPRUNE_CUDA", "0") != "1":
        assert "cudart" not in needed, "the default build must not link the CUDA runtime"


@needs_nvcc
@needs_ort_headers
@pytest.mark.skipif(os.environ.get("CTPRUNE_TEST_CUDA_BUILD") != "1",
                    reason="full CUDA library build takes minutes here: set CTPRUNE_TEST_CUDA_BUILD=1")
def test_full_cuda_library_build(tmp_path):
    env = dict(os.environ, CTPRUNE_CUDA="1", CTPRUNE_CUDA_ARCHS="90")
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-temp", str(tmp_path / "t"), "--build-lib",
                    str(tmp_path / "l")], cwd=REPO, env=env, check=True, capture_output=True, text=True)
    lib = next((tmp_path / "l").rglob("libctprune_ops*.so"))
    exported = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    assert [l.split()[-1] for l in exported.splitlines() if " T " in l] == ["RegisterCustomOps"]
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    assert "libcudart" in needed
