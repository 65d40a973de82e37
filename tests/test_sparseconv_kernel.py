"""ctprune's SparseConv CPU kernel against onnxruntime's dense Conv/Gemm on the masked weights and against the model-local
function, on fresh random layers (CTPRUNE_TEST_SEED=<n> replays a run; the seed is in every failure message).

Covered: 1x1 / 3x3 / 5x5 / 1x7 kernels, strides 1 and 2, pads, dilation, groups, FC at batch 1 and 4, blocks 1/2/4/8
with a partial last block, every activation, bias on/off, Z (full and one element), empty blocks and all-empty
layers; every tier this CPU runs (CTPRUNE_FORCE_ISA), 1 and 2 threads; output buffers poisoned with NaN; NaN/Inf
propagation; malformed nodes -> onnxruntime errors."""

import math
import os
import secrets

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ctprune.lab.layer_model import sparse_and_dense_models
from ctprune.rewrite.sparse_conv import Activation
from ctprune.runtime import session_options
from conftest import skip_without_library

SEED = int(os.environ.get("CTPRUNE_TEST_SEED", secrets.randbits(32)))
ACTIVATIONS = [Activation.none(), Activation.relu(), Activation.clip(0.0, 6.0), Activation.clip(-0.3, 0.4),
               Activation.hard_swish(), Activation.hard_sigmoid_mul(0.2, 0.5), Activation.silu()]


pytestmark = skip_without_library()


def _tiers():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    tiers = ["generic", "generic16"]
    if " avx2 " in flags and " fma " in flags:
        tiers.append("avx2")
    if " avx512f " in flags and " avx512vl " in flags:
        tiers.append("avx512")
    return tiers


TIERS = _tiers()


@pytest.fixture
def tier(request, monkeypatch):
    monkeypatch.setenv("CTPRUNE_FORCE_ISA", request.param)
    monkeypatch.setenv("CTPRUNE_POISON_OUTPUT", "1")
    return request.param


def plain_run(model, feeds):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def kernel_run(model, feeds, out_shape, threads):
    """Through ctprune's kernel, into a NaN-poisoned bound output buffer."""
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
    out = np.full(out_shape, np.nan, dtype=np.float32)
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    binding.bind_ortvalue_output("Y", ort.OrtValue.ortvalue_from_numpy(out))
    session.run_with_iobinding(binding)
    return out


# (weight shape, input shape, geometry)
SHAPES = [
    ((24, 16, 1, 1), (1, 16, 8, 8), {}),                      # 1x1, aligned planes: read in place
    ((19, 13, 1, 1), (2, 13, 7, 7), {}),                      # 1x1, 49 pixels: packed, partial vectors
    ((21, 12, 1, 1), (1, 12, 9, 11), dict(strides=(2, 2))),   # 1x1 stride 2: subsampled
    ((10, 6, 1, 1), (1, 6, 5, 6), dict(pads=(1, 0, 0, 1))),   # 1x1 with pads: general path
    ((13, 8, 3, 3), (2, 8, 10, 9), dict(pads=(1, 1, 1, 1))),
    ((12, 6, 3, 3), (1, 12, 11, 8), dict(strides=(2, 1), pads=(1, 0, 1, 2), dilations=(1, 2), group=2)),
    ((9, 5, 5, 5), (1, 5, 13, 12), dict(strides=(2, 2), pads=(2, 2, 2, 2))),
    ((16, 6, 1, 7), (1, 6, 9, 17), dict(pads=(0, 3, 0, 3))),
    ((8, 3, 3, 3), (1, 12, 6, 6), dict(group=4, dilations=(2, 2), pads=(2, 2, 2, 2))),
    ((37, 100), (1, 100), {}),                                # FC batch 1
    ((29, 70), (4, 70), {}),                                  # FC batch 4
    ((11, 70000), (1, 70000), {}),                            # FC with int32 columns
    ((14, 9, 1, 1), (2, 9, 6, 35), dict(strides=(1, 2))),     # 1x1 subsampled: columns only, rows of 18
    ((7, 10, 1, 1), (1, 10, 13, 16), dict(strides=(3, 3))),   # 1x1 subsampled: a stride other than 2
]


def _case(rng, index):
    weight_shape, x_shape, geometry = SHAPES[index % len(SHAPES)]
    return dict(weight_shape=weight_shape, x_shape=x_shape, geometry=geometry,
                block=int(rng.choice([1, 2, 4, 8])), density=float(rng.choice([0.0, 0.05, 0.2, 0.5, 1.0])),
                empty=int(rng.integers(0, 3)), bias=bool(rng.integers(0, 2)),
                activation=ACTIVATIONS[int(rng.integers(0, len(ACTIVATIONS)))],
                residual=str(rng.choice(["none", "full", "one"])), threads=int(rng.integers(1, 3)))


def _models(case, rng):
    geometry = case["geometry"]
    probe, _, _ = sparse_and_dense_models(np.random.default_rng(0), case["weight_shape"], case["x_shape"], 0.5, 1,
                                          **geometry)
    x = rng.standard_normal(case["x_shape"]).astype(np.float32)
    y_shape = plain_run(probe, {"X": x}).shape
    feeds, z_shape = {"X": x}, None
    if case["residual"] != "none":
        z_shape = y_shape if case["residual"] == "full" else (1,)
        feeds["Z"] = rng.standard_normal(z_shape).astype(np.float32)
    sparse, dense, compact = sparse_and_dense_models(
        rng, case["weight_shape"], case["x_shape"], case["density"], case["block"], empty_blocks=case["empty"],
        bias=case["bias"], activation=case["activation"], z_shape=z_shape, **geometry)
    return sparse, dense, feeds, y_shape


def _pre_activation_max(dense, feeds) -> float:
    """The largest |Conv / Gemm output| before Z and the activation (the dense model's first node): the float32
    rounding of a long sum grows with it, not with an output a Clip has cut to [-0.3, 0.4] (an FC of 70,000 inputs
    differed by 9.5e-6 from the function where the clipped scale allowed 8e-6)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(dense)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(dense.graph.node[0].output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return float(np.abs(session.run(None, feeds)[-1]).max())


def _check(case, seed):
    rng = np.random.default_rng(seed)
    sparse, dense, feeds, y_shape = _models(case, rng)
    expected = plain_run(dense, feeds)
    via_function = plain_run(sparse, feeds)
    got = kernel_run(sparse, feeds, y_shape, case["threads"])
    scale = max(1e-3, float(np.abs(expected).max()), _pre_activation_max(dense, feeds))
    msg = f"CTPRUNE_TEST_SEED={SEED} case={case}"
    assert not np.isnan(got).any(), "unwritten (poisoned) outputs: " + msg
    assert np.abs(got - expected).max() <= 2e-5 * scale, msg
    assert np.abs(got - via_function).max() <= 2e-5 * scale, msg


@pytest.mark.parametrize("tier", TIERS, indirect=True)
@pytest.mark.parametrize("index", range(len(SHAPES)))
def test_random_layers(tier, index):
    rng = np.random.default_rng([SEED, index, TIERS.index(tier)])
    for _ in range(2):
        case = _case(rng, index)
        _check(case, int(rng.integers(2**31)))


@pytest.mark.parametrize("tier", TIERS, indirect=True)
@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_every_block_and_activation(tier, block):
    rng = np.random.default_rng([SEED, block])
    for i, activation in enumerate(ACTIVATIONS):
        shape = SHAPES[[1, 4, 9][i % 3]]
        case = dict(weight_shape=shape[0], x_shape=shape[1], geometry=shape[2], block=block, density=0.3, empty=1,
                    bias=True, activation=activation, residual="full" if i % 2 else "one", threads=1 + i % 2)
        _check(case, int(rng.integers(2**31)))


@pytest.mark.parametrize("tier", TIERS, indirect=True)
def test_nan_and_inf_propagate_like_onnxruntime(tier):
    rng = np.random.default_rng(SEED)
    for shape, activation in [(SHAPES[0], Activation.relu()), (SHAPES[1], Activation.clip(-1.0, 1.0)),
                              (SHAPES[4], Activation.hard_swish()), (SHAPES[9], Activation.silu()),
                              (SHAPES[0], Activation.none())]:
        case = dict(weight_shape=shape[0], x_shape=shape[1], geometry=shape[2], block=4, density=0.5, empty=0,
                    bias=True, activation=activation, residual="full", threads=1)
        sparse, dense, feeds, y_shape = _models(case, rng)
        x = feeds["X"].reshape(-1)
        x[rng.choice(x.size, 3, replace=False)] = [np.nan, np.inf, -np.inf]
        z = feeds["Z"].reshape(-1)
        z[rng.choice(z.size, 3, replace=False)] = [np.nan, np.inf, -np.inf]
        expected = plain_run(dense, feeds)
        got = kernel_run(sparse, feeds, y_shape, 1)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=f"seed {SEED} {activation}")
        finite = np.isfinite(expected)
        np.testing.assert_array_equal(got[~finite & ~np.isnan(expected)], expected[~finite & ~np.isnan(expected)])
        if finite.any():
            assert np.allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-4 * np.abs(expected[finite]).max())


def _aligned(array):
    """A 64-byte-aligned copy, so that the kernels read X in place and may stream Y (their aligned 1x1 path)."""
    raw = np.empty(array.size + 16, dtype=np.float32)
    start = (-raw.ctypes.data % 64) // 4
    out = raw[start:start + array.size].reshape(array.shape)
    out[...] = array
    return out


@pytest.mark.parametrize("tier", TIERS, indirect=True)
@pytest.mark.parametrize("streamed", [False, True])
def test_pointwise_in_place_streamed_and_fused_check(tier, streamed, monkeypatch):
    """The 1x1 in-place path with the non-finite check inside the tile loop (forced on small inputs), with and without
    streaming stores, planes of whole vectors and planes whose last vector is partial (read and written through a lane
    mask): values as the dense Conv, every output written, NaN/inf where the dense Conv has them."""
    monkeypatch.setenv("CTPRUNE_SPARSE_FUSED_CHECK_BYTES", "0")
    monkeypatch.setenv("CTPRUNE_SPARSE_STREAM_BYTES", "0" if streamed else str(1 << 40))
    rng = np.random.default_rng([SEED, int(streamed), TIERS.index(tier)])
    shapes = [((24, 16, 1, 1), (1, 16, 8, 8)), ((19, 40, 1, 1), (1, 40, 4, 12)), ((33, 12, 1, 1), (2, 12, 16, 16)),
              ((8, 70, 1, 1), (1, 70, 2, 8)), ((21, 24, 1, 1), (2, 24, 7, 7)), ((9, 20, 1, 1), (1, 20, 3, 5))]
    for weight_shape, x_shape in shapes:
        for poisoned in (False, True):
            case = dict(weight_shape=weight_shape, x_shape=x_shape, geometry={}, block=int(rng.choice([1, 2, 4, 8])),
                        density=float(rng.choice([0.1, 0.3, 1.0])), empty=int(rng.integers(0, 2)),
                        bias=bool(rng.integers(0, 2)), activation=ACTIVATIONS[int(rng.integers(0, len(ACTIVATIONS)))],
                        residual=str(rng.choice(["none", "full", "one"])), threads=int(rng.integers(1, 3)))
            sparse, dense, feeds, y_shape = _models(case, rng)
            if poisoned:  # one value per run of channels: some land in channels that no block keeps
                x = feeds["X"].reshape(-1)
                x[rng.choice(x.size, 3, replace=False)] = [np.nan, np.inf, -np.inf]
            feeds = {name: _aligned(value) for name, value in feeds.items()}
            expected = plain_run(dense, feeds)
            session = ort.InferenceSession(sparse.SerializeToString(), session_options(case["threads"]),
                                           providers=["CPUExecutionProvider"])
            out = _aligned(np.full(y_shape, np.nan, dtype=np.float32))
            binding = session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            binding.bind_ortvalue_output("Y", ort.OrtValue.ortvalue_from_numpy(out))
            session.run_with_iobinding(binding)
            msg = f"CTPRUNE_TEST_SEED={SEED} case={case} poisoned={poisoned}"
            np.testing.assert_array_equal(np.isnan(out), np.isnan(expected), err_msg=msg)
            finite = np.isfinite(expected)
            np.testing.assert_array_equal(np.isinf(out), np.isinf(expected), err_msg=msg)
            scale = max(1e-3, float(np.abs(expected[finite]).max())) if finite.any() else 1.0
            assert np.abs(out[finite] - expected[finite]).max(initial=0.0) <= 2e-5 * scale, msg


def _at_page_end(array):
    """A copy of `array` that ends where an inaccessible page begins (reading past its end faults), and the mapping
    that holds it."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    pages = (array.nbytes + page - 1) // page + 1
    mapping = mmap.mmap(-1, pages * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    libc = ctypes.CDLL(None, use_errno=True)
    guard = ctypes.c_void_p(address + (pages - 1) * page)
    prot_none = 0  # PROT_NONE (the mmap module does not export it)
    assert libc.mprotect(guard, ctypes.c_size_t(page), prot_none) == 0, ctypes.get_errno()
    out = np.frombuffer(mapping, dtype=np.float32, count=array.size, offset=(pages - 1) * page - array.nbytes)
    out = out.reshape(array.shape)
    out[...] = array
    return out, mapping


@pytest.mark.parametrize("tier", TIERS, indirect=True)
@pytest.mark.parametrize("fused_check", [False, True])
def test_pointwise_in_place_reads_no_further_than_x(tier, fused_check, monkeypatch):
    """X read in place whose planes end in a partial vector, with X's last byte just before an inaccessible page: the
    kernels (and the non-finite check) read the last plane's partial vector through a lane mask, never past X."""
    monkeypatch.setenv("CTPRUNE_SPARSE_FUSED_CHECK_BYTES", "0" if fused_check else str(1 << 40))
    rng = np.random.default_rng([SEED, int(fused_check), TIERS.index(tier)])
    for weight_shape, x_shape in [((8, 3, 1, 1), (1, 3, 7, 7)), ((6, 5, 1, 1), (2, 5, 3, 5)),
                                  ((12, 9, 1, 1), (1, 9, 14, 14))]:
        case = dict(weight_shape=weight_shape, x_shape=x_shape, geometry={}, block=int(rng.choice([1, 2, 4, 8])),
                    density=0.5, empty=0, bias=True, activation=Activation.relu(), residual="none", threads=1)
        sparse, dense, feeds, y_shape = _models(case, rng)
        expected = plain_run(dense, feeds)
        x, mapping = _at_page_end(feeds["X"])
        session = ort.InferenceSession(sparse.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
        x_value = ort.OrtValue.ortvalue_from_numpy(x)
        assert x_value.data_ptr() == x.ctypes.data  # the kernel sees X itself, not a copy
        out = np.full(y_shape, np.nan, dtype=np.float32)
        binding = session.io_binding()
        binding.bind_ortvalue_input("X", x_value)
        binding.bind_ortvalue_output("Y", ort.OrtValue.ortvalue_from_numpy(out))
        session.run_with_iobinding(binding)
        msg = f"CTPRUNE_TEST_SEED={SEED} case={case}"
        assert not np.isnan(out).any(), "unwritten (poisoned) outputs: " + msg
        assert np.abs(out - expected).max() <= 2e-5 * max(1e-3, float(np.abs(expected).max())), msg


def _malformed(**overrides):
    rng = np.random.default_rng(0)
    sparse, _, _ = sparse_and_dense_models(rng, (8, 4, 3, 3), (1, 4, 6, 6), 0.5, 4, function=False)
    for key, value in overrides.items():
        for attr in list(sparse.graph.node[0].attribute):
            if attr.name == key:
                sparse.graph.node[0].attribute.remove(attr)
        if value is not None:
            kind = onnx.AttributeProto.INTS if isinstance(value, list) else None
            sparse.graph.node[0].attribute.append(onnx.helper.make_attribute(key, value, attr_type=kind))
    return sparse


def _initializer(model, suffix, array):
    for i, t in enumerate(model.graph.initializer):
        if t.name.endswith(suffix):
            model.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(array, t.name))


@pytest.mark.parametrize("what", [
    "block_3", "block_order_dup", "block_order_short", "weight_shape_3d", "group_bad", "strides_zero", "pads_neg",
    "activation_9", "min_gt_max", "p_decreasing", "p_wrong_end", "i_out_of_range", "i_not_increasing", "w_shape",
    "x_channels", "missing_block_order", "float_block", "p_past_rows",
])
def test_malformed_nodes_fail_cleanly(what):
    model = {
        "block_3": lambda: _malformed(block=3),
        "block_order_dup": lambda: _malformed(block_order=[0, 0]),
        "block_order_short": lambda: _malformed(block_order=[0]),
        "weight_shape_3d": lambda: _malformed(weight_shape=[8, 4, 3]),
        "group_bad": lambda: _malformed(group=3),
        "strides_zero": lambda: _malformed(strides=[0, 1]),
        "pads_neg": lambda: _malformed(pads=[-1, 0, 0, 0]),
        "activation_9": lambda: _malformed(activation=9),
        "min_gt_max": lambda: _malformed(activation_min=2.0, activation_max=1.0),
        "missing_block_order": lambda: _malformed(block_order=None),
        "float_block": lambda: _malformed(block=4.0),
    }.get(what, lambda: _malformed())()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    if what == "p_decreasing":
        _initializer(model, ".blocks", np.array([0, 5, 3], np.int32))
    elif what == "p_wrong_end":
        p = onnx.numpy_helper.to_array([t for t in model.graph.initializer if t.name.endswith(".blocks")][0]).copy()
        p[-1] += 1
        _initializer(model, ".blocks", p)
    elif what in ("i_out_of_range", "i_not_increasing"):
        cols = onnx.numpy_helper.to_array([t for t in model.graph.initializer if t.name.endswith(".columns")][0]).copy()
        if what == "i_out_of_range":
            cols[0] = 36
        else:
            cols[1] = cols[0]
        _initializer(model, ".columns", cols)
    elif what == "w_shape":
        _initializer(model, ".values", np.zeros((3, 4), np.float32))
    elif what == "p_past_rows":  # P rises past the rows of I, then falls back to end at them (a fuzz find: it read I
        # out of bounds)
        cols = onnx.numpy_helper.to_array([t for t in model.graph.initializer if t.name.endswith(".columns")][0])
        _initializer(model, ".columns", cols[:2].copy())
        _initializer(model, ".values", np.zeros((2, 4), np.float32))
        _initializer(model, ".blocks", np.array([0, 5, 2], np.int32))
    elif what == "x_channels":
        x = rng.standard_normal((1, 5, 6, 6)).astype(np.float32)
        model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 5
    with pytest.raises(Exception) as err:
        sess = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
        sess.run(None, {"X": x})
    assert "SparseConv" in str(err.value) or "block" in str(err.value), str(err.value)
    if what == "p_past_rows":  # refused before I is read, not by a later block's check after reading past its end
        assert "past the rows of I" in str(err.value), str(err.value)
