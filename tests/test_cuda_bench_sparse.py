"""ctprune.lab.bench_cuda --sparse without a GPU: it says why it cannot run (exit 2), and its tables render from rows."""

import pytest
import torch

from ctprune.lab import bench_cuda, bench_cuda_sparse


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the benchmark would run for minutes")
def test_without_a_gpu_it_exits_2_with_a_reason(capsys):
    assert bench_cuda.main(["--sparse", "--quick"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_tables_render():
    rows = [dict(kind="conv", shape="96x24x56", ratio=r, achieved=r, batch=b, fp32_us=100.0, tf32_us=50.0,
                 ours_us=100.0 / s, vs_fp32=s, vs_tf32=s / 2, gflops=800.0, err=2e-7)
            for r, b, s in [(8.0, 1, 2.0), (8.0, 1, 4.0), (2.0, 32, 0.5)]]
    table = bench_cuda_sparse.render(rows)
    assert table.count("\n") == 4
    assert "| conv | 96x24x56 | 8x | 1 | 100.0 | 50.0 | 50.0 | 2.00x | 1.00x | 800 | 2.0e-07 |" in table
    summary = bench_cuda_sparse.summary(rows)
    assert "| 8x | 1 | 3.00x | 2.00x | 4.00x | 1.50x |" in summary and "| 2x | 32 | 0.50x |" in summary
