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


CUDA_OP_SOURCES = sorted(p for p in (CSRC / "cuda").glob("*.cc") if not p.name.endswith("_emulate.cc"))


@pytest.fixture(scope="module")
def kernel_object(tmp_path_factory):
    """nvcc -c of the kernel for sm_90 (warnings are errors); (object path, ptxas report, spec objects): the spec
    checks (csrc/ops, free of onnxruntime) that every standalone build of the kernel links beside it."""
    from ctprune.lab.cuda_harness import SPEC_SOURCES

    folder = tmp_path_factory.mktemp("nvcc")
    obj = folder / "pattern_conv_impl.o"
    out = subprocess.run([NVCC, "-c", str(CSRC / "cuda" / "pattern_conv_impl.cu"), "-o", str(obj), "-O3", "-std=c++17",
                          "-arch=sm_90", "-Xcompiler", "-fPIC", f"-I{CSRC}", "-Werror", "all-warnings", "-Xptxas", "-v"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    spec_objects = []
    for source in SPEC_SOURCES:
        spec_objects.append(folder / (Path(source).stem + ".o"))
        subprocess.run(["g++", "-c", str(CSRC / source), "-o", str(spec_objects[-1]), "-O1", "-std=c++17", "-fPIC",
                        "-Wall", "-Werror", f"-I{CSRC}"], check=True, capture_output=True, text=True)
    return obj, out.stdout + out.stderr, spec_objects


@pytest.fixture(scope="module")
def other_kernel_objects(tmp_path_factory):
    """nvcc -c of the other .cu files of csrc/cuda (SparseConv's), which a CUDA build links beside PatternConv's."""
    folder = tmp_path_factory.mktemp("nvcc_other")
    objects = []
    for source in sorted((CSRC / "cuda").glob("*.cu")):
        if source.name == "pattern_conv_impl.cu":
            continue
        objects.append(folder / (source.stem + ".o"))
        subprocess.run([NVCC, "-c", str(source), "-o", str(objects[-1]), "-O3", "-std=c++17", "-arch=sm_90",
                        "-Xcompiler", "-fPIC", f"-I{CSRC}"], check=True, capture_output=True, text=True)
    return objects


@needs_nvcc
def test_nvcc_compiles_the_kernel(kernel_object):
    obj, _, _ = kernel_object
    defined = symbols(obj, "--defined-only")
    for name in C_ABI:
        assert re.search(rf" T {name}\b", defined), f"{name} not exported by the kernel object"
    raw = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
    for instance in KERNEL_INSTANCES:  # every (filters, pixels) per thread the dispatcher names
        assert f"PatternConvKernel{instance}" in raw, f"kernel instance {instance} missing"


@needs_nvcc
def test_kernel_keeps_accumulators_in_registers(kernel_object):
    # Spilled accumulators would go through local memory; ptxas reports spills per instance.
    _, report, _ = kernel_object
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
    assert len(spills) >= len(KERNEL_INSTANCES), report  # each kernel, and each out-of-line (cold) function
    assert max(spills) == 0, f"spills: {spills}"


@needs_nvcc
def test_c_abi_loads_and_reports_errors_without_crashing(kernel_object, tmp_path):
    # The harness library (static cudart): it loads anywhere; without a GPU, prepare fails with a CUDA error message
    # instead of crashing, and bad attributes are named before any CUDA call.
    import numpy as np

    from ctprune.lab.cuda_harness import CudaPatternConv, KernelCallError, random_layer

    lib = tmp_path / "libpattern_conv_cuda.so"
    subprocess.run([NVCC, "-shared", "-o", str(lib), str(kernel_object[0])] + [str(p) for p in kernel_object[2]],
                   check=True, capture_output=True, text=True)
    CudaPatternConv._lib = None
    try:
        layer = random_layer(8, 4, 4.0, np.random.default_rng(0))
        bad = random_layer(8, 4, 4.0, np.random.default_rng(0))
        bad.kernel_filters = list(reversed(bad.kernel_filters))
        with pytest.raises(KernelCallError, match="invalid PatternConv attributes"):
            CudaPatternConv(bad, lib)
        import torch

        if not torch.cuda.is_available():
            with pytest.raises(KernelCallError, match="PatternConv kernel status"):
                CudaPatternConv(layer, lib)
    finally:
        CudaPatternConv._lib = None


@needs_nvcc
@needs_ort_headers
def test_onnxruntime_op_compiles_against_cuda_headers(tmp_path):
    flags = ["-std=c++17", "-Wall", "-Werror", "-fPIC", "-DCTPRUNE_WITH_CUDA", f"-I{CSRC}", f"-I{ORT_INCLUDE}",
             f"-I{ORT_INCLUDE.parent}", f"-I{cuda_include()}"]
    defined = ""
    for source in CUDA_OP_SOURCES:  # the ops and the backend's registration
        obj = tmp_path / (source.stem + ".o")
        subprocess.run(["g++", "-c", str(source), "-o", str(obj), "-O1"] + flags, check=True, capture_output=True,
                       text=True)
        defined += symbols(obj, "--defined-only")
    assert "ctprune::cuda::RegisterOps(Ort::CustomOpDomain&)" in defined
    # register.cc calls cuda::RegisterOps, an inline no-op without CTPRUNE_WITH_CUDA: it must compile both ways.
    for extra in ([], ["-UCTPRUNE_WITH_CUDA"]):
        subprocess.run(["g++", "-fsyntax-only", str(CSRC / "ops" / "register.cc")] + flags + extra,
                       check=True, capture_output=True, text=True)


@needs_nvcc
@needs_ort_headers
def test_cuda_enabled_library_links_and_loads(kernel_object, other_kernel_objects, tmp_path):
    # The CUDA build's link, without recompiling the CPU kernels: the CPU objects of the last `pip install -e .`,
    # register.cc with CTPRUNE_WITH_CUDA, the CUDA op and the nvcc object. It must link with no undefined symbol,
    # export only RegisterCustomOps, need libcudart, and load into (CPU) onnxruntime, whose PatternConv still works.
    import sysconfig

    temp = REPO / "build" / f"temp.{sysconfig.get_platform()}-cpython-{sys.version_info.major}{sys.version_info.minor}"
    cpu_objects = sorted((temp / "csrc" / "cpu").glob("*.o")) + sorted(
        p for p in (temp / "csrc" / "ops").glob("*.o") if p.stem != "register")
    if not all(p.exists() for p in cpu_objects) or len(cpu_objects) < 2:
        pytest.skip(f"no CPU objects from a previous build in {temp}")
    sources = [p for p in CSRC.rglob("*") if p.suffix in (".cc", ".h", ".inc") and "cuda" not in p.parts
               and "lab" not in p.parts]
    if max(p.stat().st_mtime for p in sources) > min(p.stat().st_mtime for p in cpu_objects):
        pytest.skip("the CPU objects are older than csrc/: rebuild (pip install -e .) first")
    inc = cuda_include()
    flags = ["-O1", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-DCTPRUNE_WITH_CUDA", f"-I{CSRC}", f"-I{ORT_INCLUDE}",
             f"-I{ORT_INCLUDE.parent}", f"-I{inc}"]
    objs = []
    for src in [CSRC / "ops" / "register.cc"] + CUDA_OP_SOURCES:
        obj = tmp_path / (src.stem + ".o")
        subprocess.run(["g++", "-c", str(src), "-o", str(obj)] + flags, check=True, capture_output=True, text=True)
        objs.append(obj)
    lib_dir = str(Path(inc).parent / "lib")
    lib = tmp_path / "libctprune_ops_cuda.so"
    kernels = [kernel_object[0]] + other_kernel_objects
    linked = subprocess.run(["g++", "-shared", "-o", str(lib)] + [str(p) for p in cpu_objects + objs + kernels] +
                            [f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}", "-lcudart", "-Wl,--no-undefined",
                             f"-Wl,--version-script={CSRC / 'ops' / 'exports.lds'}"], capture_output=True, text=True)
    assert linked.returncode == 0, linked.stderr
    exported = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    assert [l.split()[-1] for l in exported.splitlines() if " T " in l] == ["RegisterCustomOps"]
    assert "libcudart" in subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout

    import numpy as np
    import onnxruntime as ort

    from test_patternconv_matrix import CORNERS, build, plain_run

    pattern_model, dense_model, _, x = build(CORNERS[2], 7)
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(lib))
    y = ort.InferenceSession(pattern_model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"X": x})[0]
    dense = plain_run(dense_model, x, 1)
    assert np.abs(y - dense).max() / np.abs(dense).max() <= 1e-5


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
