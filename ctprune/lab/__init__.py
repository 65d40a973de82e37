"""The kernel lab: random pruned layers (layer_model.py), per-layer benchmarks against onnxruntime's dense ops
(bench_layers.py), and the CUDA kernels' harnesses and benchmarks (cuda_harness.py, cuda_sparse_harness.py over
cuda_library.py; bench_cuda.py, bench_cuda_sparse.py)."""
