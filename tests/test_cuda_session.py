"""PatternConv inside onnxruntime-gpu: a session on CUDAExecutionProvider runs ctprune's CUDA kernel (no CPU
fallback allowed) and matches the dense Conv on the masked weights.

Skips unless onnxruntime-gpu (CUDAExecutionProvider), a CUDA GPU and a kernel library built with CTPRUNE_CUDA=1 are
all here."""

import json
import math
import os
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ctprune.errors import CtpruneError
from ctprune.runtime import kernel_library_path, session_options

from test_patternconv_matrix import CORNERS, SEED, _ids, build, plain_run


def _cuda_library_or_reason():
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None, "onnxruntime-gpu is not installed (no CUDAExecutionProvider): pip install ctprune[gpu]"
    if not torch.cuda.is_available():
        return None, "no CUDA GPU here (torch.cuda.is_available() is False)"
    try:
        lib = kernel_library_path()
    except CtpruneError as e:
        return None, f"kernel library not built: {e}"
    needed = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True).stdout
    if "cudart" not in needed:
        return None, "kernel library built without CUDA: rebuild with CTPRUNE_CUDA=1 pip install -e ."
    return lib, ""


LIBRARY, REASON = _cuda_library_or_reason()
pytestmark = pytest.mark.skipif(LIBRARY is None, reason=REASON or "n/a")


def cuda_session(model, profile_dir=None):
    options = session_options()
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # fail rather than run on the CPU
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "prof")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])


@pytest.mark.parametrize("index", range(len(CORNERS)), ids=_ids(CORNERS))
def test_session_matches_dense_conv(index):
    case = CORNERS[index]
    pattern_model, dense_model, _, x = build(case, SEED + index)
    dense = plain_run(dense_model, x, 1)  # onnxruntime's own float32 Conv on the CPU
    session = cuda_session(pattern_model)
    out = np.full(dense.shape, math.nan, dtype=np.float32)
    binding = session.io_binding()
    binding.bind_cpu_input("X", x)
    y_gpu = ort.OrtValue.ortvalue_from_numpy(out, "cuda", 0)  # NaN-poisoned output buffer on the device
    binding.bind_ortvalue_output("Y", y_gpu)
    session.run_with_iobinding(binding)
    y = binding.get_outputs()[0].numpy()
    where = f"seed {SEED + index}, case {case}"
    assert not np.isnan(y).any(), f"unwritten outputs: {where}"
    err = float(np.abs(y.astype(np.float64) - dense).max() / max(np.abs(dense).max(), 1e-30))
    assert err <= 1e-5, f"rel err {err:.2e}: {where}"


def test_kernel_runs_on_the_cuda_provider(tmp_path):
    pattern_model, _, _, x = build(CORNERS[1], SEED)
    session = cuda_session(pattern_model, str(tmp_path))
    session.run(None, {"X": x})
    profile = json.loads(open(session.end_profiling()).read())
    providers = {e["args"].get("provider") for e in profile if e.get("args", {}).get("op_name") == "PatternConv"}
    assert providers == {"CUDAExecutionProvider"}, providers

