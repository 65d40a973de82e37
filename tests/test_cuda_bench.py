"""ctprune.lab.bench_cuda without a GPU: it says why it cannot run (exit 2), and its tables render from measured rows.
On a GPU machine the whole benchmark is `python -m ctprune.lab.bench_cuda` (tests/test_cuda_kernel.py checks the kernel)."""

import pytest
import torch

from ctprune.lab import bench_cuda


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the benchmark would run for minutes")
def test_without_a_gpu_it_exits_2_with_a_reason(capsys):
    assert bench_cuda.main(["--quick"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_tables_render():
    rows = [dict(C=64, H=56, ratio=r, achieved=r, batch=b, fp32_us=100.0, tf32_us=50.0, ours_us=100.0 / s,
                 vs_fp32=s, vs_tf32=s / 2, gflops=1000.0, err=1e-6)
            for r, b, s in [(8.0, 1, 2.0), (8.0, 1, 4.0), (2.25, 32, 0.5)]]
    table = bench_cuda.render(rows)
    assert table.count("\n") == 4 and "| 64 | 56 | 8x | 1 | 100.0 | 50.0 | 50.0 | 2.00x | 1.00x | 1000 | 1.0e-06 |" in table
    summary = bench_cuda.summary(rows)
    assert "| 8x | 1 | 3.00x | 2.00x | 4.00x | 1.50x |" in summary and "| 2.25x | 32 | 0.50x |" in summary
