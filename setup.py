"""Build and install ctprune.

The custom-op library (csrc/) is built as a plain shared object against onnxruntime's C/C++ headers alone: it does not
link to onnxruntime (the runtime hands its API table to RegisterCustomOps) and it does not need torch, so pip's isolated
build stays small. Headers come from ORT_INCLUDE_DIR, else .deps/onnxruntime/include (scripts/fetch_ort_headers.sh fetches
them from Debian's libonnxruntime-dev on first build).
"""

import os
import pathlib
import shlex
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).resolve().parent
DEPS_ORT = ROOT / ".deps" / "onnxruntime"


def ort_include_dir() -> str:
    """Where onnxruntime_c_api.h lives: ORT_INCLUDE_DIR, or headers fetched into .deps on first build."""
    env = os.environ.get("ORT_INCLUDE_DIR")
    if env:
        if not (pathlib.Path(env) / "onnxruntime_c_api.h").exists() and not (
            pathlib.Path(env) / "onnxruntime" / "onnxruntime_c_api.h"
        ).exists():
            raise SystemExit(f"ORT_INCLUDE_DIR={env} holds no onnxruntime_c_api.h")
        return env
    header = DEPS_ORT / "include" / "onnxruntime" / "onnxruntime_c_api.h"
    if not header.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "fetch_ort_headers.sh"), str(DEPS_ORT)], check=True)
    return str(DEPS_ORT / "include" / "onnxruntime")


class BuildKernels(build_ext):
    """build_ext that resolves the onnxruntime include dir only when the library is actually built."""

    def build_extensions(self):
        include = ort_include_dir()
        cuda = cuda_toolkit()
        for ext in self.extensions:
            ext.include_dirs = [include, os.path.dirname(include), str(ROOT / "csrc")] + list(ext.include_dirs)
            if cuda:
                add_cuda(ext, cuda, pathlib.Path(self.build_temp), [include, str(ROOT / "csrc")])
        compile_in_parallel(self.compiler)
        super().build_extensions()

    def get_export_symbols(self, ext):
        # A custom-op library, not a Python extension module: it exports RegisterCustomOps, not PyInit_*.
        return []


# The longest compiles, started first (GCC 12 -O3, one core of a Zen 3: 80 s, 24 s, 16 s, 15 s, 14 s; the rest 0.2-3 s).
SLOW_SOURCES = ("sparse_conv_generic16.cc", "sparse_conv_generic.cc", "pattern_conv_generic.cc",
                "sparse_conv_avx512.cc", "sparse_conv_avx2.cc")


def compile_order(source):
    name = os.path.basename(source)
    return SLOW_SOURCES.index(name) if name in SLOW_SOURCES else len(SLOW_SOURCES)


def compile_in_parallel(compiler):
    """Compile one extension's sources on every core: distutils compiles them one at a time (~3 minutes in a row for
    the kernel library on an idle 2-core Zen 3, 8 on a loaded one). Same commands, same objects."""
    serial = compiler.compile

    def compile(sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        if not hasattr(compiler, "_compile") or not build:
            return serial(sources, output_dir, macros, include_dirs, debug, extra_preargs, extra_postargs, depends)
        cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
        todo = sorted(build.items(), key=lambda item: compile_order(item[1][0]))
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            jobs = [pool.submit(compiler._compile, obj, src, ext, cc_args, extra_postargs, pp_opts)
                    for obj, (src, ext) in todo]
            for job in jobs:
                job.result()
        return objects

    compiler.compile = compile


# --- CUDA (csrc/cuda/): off unless CTPRUNE_CUDA=1; then nvcc must be found, and the library links cudart. ---
# CTPRUNE_CUDA_ARCHS: semicolon-separated SM versions (default 80;86;89;90, plus PTX of the last for newer GPUs).
CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))  # nvcc
# the onnxruntime ops and their registration, g++ against the CUDA headers (the *_emulate.cc files are test harnesses)
CUDA_HOST_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cc")
                           if not p.name.endswith("_emulate.cc"))


def cuda_toolkit():
    """{nvcc, include, lib} when CTPRUNE_CUDA=1, None when it is unset or 0; a clear error if nvcc is missing."""
    flag = os.environ.get("CTPRUNE_CUDA", "0").strip().lower()
    if flag in ("", "0", "off", "no", "false"):
        return None
    if flag not in ("1", "on", "yes", "true"):
        raise SystemExit(f"CTPRUNE_CUDA={flag!r}: use 1 to build the CUDA kernels or 0 to leave them out")
    nvcc = shutil.which(os.environ.get("NVCC") or "nvcc")
    if not nvcc:
        raise SystemExit("CTPRUNE_CUDA=1 but nvcc was not found (PATH, or NVCC=/path/to/nvcc): install the CUDA toolkit "
                         "or build without CTPRUNE_CUDA")
    # nvcc --dryrun names its own include and library dirs (nvcc may be a wrapper script outside the toolkit).
    dry = subprocess.run([nvcc, "--dryrun", "-shared", "-o", "x.so", "x.cu"], capture_output=True, text=True)
    lines = (dry.stdout + dry.stderr).splitlines()
    found = {}
    for line in lines:
        for key in ("INCLUDES=", "LIBRARIES="):
            if line.startswith("#$ " + key):
                found[key] = [a[2:] for a in shlex.split(line.split(key, 1)[1]) if a[:2] in ("-I", "-L")]
    includes = [d for d in found.get("INCLUDES=", []) if os.path.isdir(d)]
    libs = [d for d in found.get("LIBRARIES=", []) if os.path.isdir(d) and not d.rstrip("/").endswith("stubs")]
    if not includes or not libs:
        raise SystemExit(f"CTPRUNE_CUDA=1: could not find the CUDA include/lib dirs from `{nvcc} --dryrun`")
    return {"nvcc": nvcc, "include": includes[0], "lib": libs[0]}


def cuda_arch_flags():
    archs = [a.strip() for a in os.environ.get("CTPRUNE_CUDA_ARCHS", "80;86;89;90").replace(",", ";").split(";")]
    archs = [a.removeprefix("sm_") for a in archs if a]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def add_cuda(ext, cuda, build_temp, include_dirs):
    """Compile the .cu files with nvcc into objects for ext, and build ext with CTPRUNE_WITH_CUDA against cudart."""
    build_temp.mkdir(parents=True, exist_ok=True)
    for src in CUDA_SOURCES:
        obj = build_temp / (pathlib.Path(src).stem + ".cu.o")
        cmd = [cuda["nvcc"], "-c", str(ROOT / src), "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
               "-Xcompiler", "-fvisibility=hidden"] + [f"-I{d}" for d in include_dirs] + cuda_arch_flags()
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)
        ext.extra_objects.append(str(obj))
    ext.sources = list(ext.sources) + [s for s in CUDA_HOST_SOURCES if s not in ext.sources]
    ext.define_macros.append(("CTPRUNE_WITH_CUDA", "1"))
    ext.include_dirs.append(cuda["include"])
    ext.library_dirs.append(cuda["lib"])
    ext.runtime_library_dirs.append(cuda["lib"])
    ext.libraries.append("cudart")


def kernel_sources():
    # csrc/cuda joins only in a CUDA build (add_cuda); csrc/lab holds experiments built by their own scripts
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cc")
                   if "cuda" not in p.parts and "lab" not in p.parts)
    return files


kernels = Extension(
    "ctprune._lib.libctprune_ops",
    sources=kernel_sources(),
    # headers and the tile kernel's .inc: an edit to one rebuilds the library (make test after a kernel change)
    depends=sorted(str(p.relative_to(ROOT)) for ext in ("*.h", "*.inc") for p in (ROOT / "csrc").rglob(ext)
                   if "cuda" not in p.parts and "lab" not in p.parts),
    language="c++",
    extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-fno-math-errno", "-Wall"],
    extra_link_args=["-Wl,--version-script=" + str(ROOT / "csrc" / "ops" / "exports.lds")],
)

setup(
    name="ctprune",
    version="0.1.0",
    description="ONNX-to-ONNX CNN compression: ClickTrain pattern pruning and PreCropping, with fast PatternConv kernels",
    packages=find_packages(include=["ctprune", "ctprune.*"]) + ["ctprune.ops"],
    package_dir={"ctprune.ops": "ops"},
    package_data={"ctprune.ops": ["*.md"]},
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.24",
        "onnx>=1.16",
        "onnxruntime>=1.21",
        "onnxscript>=0.3",
        "torch>=2.1",
        "click>=8.1",
        "tqdm>=4.60",
        "pillow>=9",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout", "matplotlib"],
        "gpu": ["onnxruntime-gpu>=1.21"],
    },
    ext_modules=[kernels] if kernel_sources() else [],
    cmdclass={"build_ext": BuildKernels},
    entry_points={"console_scripts": ["ctprune=ctprune.cli:_entry"]},
)
