"""Build and install ctprune.

The custom-op library (csrc/) is built as a plain shared object against onnxruntime's C/C++ headers alone: it does not
link to onnxruntime (the runtime hands its API table to RegisterCustomOps) and it does not need torch, so pip's isolated
build stays small. Headers come from ORT_INCLUDE_DIR, else .deps/onnxruntime/include (scripts/fetch_ort_headers.sh fetches
them from Debian's libonnxruntime-dev on first build).
"""

import os
import pathlib
import subprocess

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
        for ext in self.extensions:
            ext.include_dirs = [include, os.path.dirname(include), str(ROOT / "csrc")] + list(ext.include_dirs)
        super().build_extensions()

    def get_export_symbols(self, ext):
        # A custom-op library, not a Python extension module: it exports RegisterCustomOps, not PyInit_*.
        return []


def kernel_sources():
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cc") if "cuda" not in p.parts)
    return files


kernels = Extension(
    "ctprune._lib.libctprune_ops",
    sources=kernel_sources(),
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
        "onnx-ir>=0.1",
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
