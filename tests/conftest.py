"""Shared fixtures and helpers: model sources, onnxruntime runs, the relative-error measure."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

REPO = Path(__file__).resolve().parents[1]
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
REAL_MODELS_DIR = Path(os.environ.get("CTPRUNE_REAL_MODELS", REPO / ".deps" / "models"))


# Markers (declared in pytest.ini) by what a test needs that a machine may lack, in one table: "file" marks a whole
# module, "file::test" one test function (every parametrization of it). A new file joins with a line here.
MARKED = {
    "gpu": ("test_cuda_kernel.py", "test_cuda_kernel_sparse.py", "test_cuda_session.py"),
    "real_models": ("test_real_models_every_conv.py", "test_graph_parity.py::test_real_model",
                    "test_graph_parity.py::test_paddle_weights_are_constant_nodes",
                    "test_graph_parity.py::test_tf_model_is_nhwc"),
    "slow": ("test_real_models_every_conv.py", "test_hardening_kill.py", "test_hardening_graph_size.py",
             "test_fuzz_patternconv.py", "test_fuzz_sparseconv.py", "test_train_examples.py", "test_precrop_real.py"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        function = f"{module}::{item.originalname}"
        for mark, where in MARKED.items():
            if module in where or function in where:
                item.add_marker(getattr(pytest.mark, mark))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(isinstance(v, str) and v == "avx512" for v in params.values()):  # an ISA tier (tier="avx512")
            item.add_marker(pytest.mark.avx512)


@functools.lru_cache(maxsize=1)
def kernel_library_or_none() -> str | None:
    """The path of ctprune's built kernel library, or None where it is not built (pip install -e .)."""
    from ctprune.errors import CtpruneError
    from ctprune.runtime import kernel_library_path

    try:
        return kernel_library_path()
    except CtpruneError:
        return None


def skip_without_library():
    """A skip mark for tests that run ctprune's kernels: `needs_library = skip_without_library()`."""
    return pytest.mark.skipif(kernel_library_or_none() is None,
                              reason="ctprune's kernel library is not built (pip install -e .)")


@pytest.fixture(scope="session")
def library():
    """The kernel library's path; the test is skipped, saying why, where it is not built."""
    from ctprune.runtime import kernel_library_path

    try:
        return kernel_library_path()
    except Exception as err:  # not built: every kernel test says why instead of erroring
        pytest.skip(f"kernel library not built: {err}")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (tiny convs and batches: on a shared 2-core machine a second thread costs far
    more than it saves); modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(a, b) -> float:
    """max|a-b| / max|b|: the project's parity measure."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def run_ort(model, *inputs: np.ndarray, threads: int = 1) -> list[np.ndarray]:
    """Outputs of onnxruntime (CPU) for a ModelProto or its serialized bytes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    data = model if isinstance(model, bytes) else model.SerializeToString()
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, inputs)))


def randomize_placeholders(model: onnx.ModelProto, seed: int = 0, inplace: bool = False) -> onnx.ModelProto:
    """The onnx wheel's light_* models compute their weights with ConstantOfShape (placeholders); replace each by a
    random initializer of that shape (He-scaled for kernels, in [0.5, 1.5] for 1-D tensors so BN variances stay
    positive). IR 3 is kept, so the new initializers are also listed as graph inputs."""
    rng = np.random.default_rng(seed)
    if inplace:
        m = model
    else:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    g = m.graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer if t.data_type == onnx.TensorProto.INT64}
    keep, new = [], []
    for node in g.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = [int(d) for d in inits[node.input[0]]]
            new.append((node.output[0], shape, _random_bytes(rng, shape)))
            continue
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    used = {n for node in keep for n in node.input}
    dead = {t.name for t in g.initializer if t.name not in used}
    for t in [t for t in g.initializer if t.name in dead]:
        g.initializer.remove(t)
    for vi in [vi for vi in g.input if vi.name in dead]:
        g.input.remove(vi)
    for name, shape, raw in new:
        t = g.initializer.add()  # filled in place: no copy of the (up to 400 MB) tensor
        t.name, t.data_type, t.raw_data = name, onnx.TensorProto.FLOAT, raw
        t.dims.extend(shape)
        if m.ir_version < 4:
            g.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
    return m


def _random_bytes(rng, shape) -> bytes:
    n = int(np.prod(shape))
    if len(shape) < 2:
        return rng.uniform(0.5, 1.5, n).astype(np.float32).tobytes()
    # A random block repeated to size: drawing 100M+ normals for VGG's fc6 would take longer than the test.
    block = (rng.standard_normal(min(n, 1 << 16), dtype=np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[1:]))))
    raw = block.tobytes()
    reps, rest = divmod(n, block.size)
    return raw * reps + raw[: rest * 4]


def light_model_path(name: str) -> Path:
    return LIGHT_DIR / f"light_{name}.onnx"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
