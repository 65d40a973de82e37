"""The kernel lab: random pruned layers (layer_model.py), per-layer benchmarks against onnxruntime's dense ops
(bench_layers.py), and the CUDA kernels' harness and benchmark (cuda_harness.py, bench_cuda.py)."""
