"""Out of memory is one clear message, exit 2, nothing written (issue 18, item 4, the pipeline's part).

The child process imports everything first, then caps its address space (RLIMIT_AS) a little above what it holds:
onnx's light VGG-19 is a 9 kB file whose ConstantOfShape placeholders become 548 MB of weights, far over the cap."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import light_model_path

VGG = light_model_path("vgg19")
HEADROOM = 700 << 20  # above the address space after imports: start-up fits, the weights do not

CHILD = textwrap.dedent("""
    import resource, sys
    import numpy, onnx, onnxruntime, torch
    import ctprune.cli, ctprune.pipeline, ctprune.pruning, ctprune.rewrite, ctprune.runtime.bench, ctprune.report
    torch.set_num_threads(1)
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[1]), resource.RLIM_INFINITY))
    sys.exit(ctprune.cli.run(sys.argv[2:]))
""")


@pytest.mark.skipif(not VGG.exists(), reason="light_vgg19 is not in this onnx wheel")
def test_out_of_memory_is_one_message_and_writes_nothing(tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(HEADROOM), str(VGG), "--ratio", "8x", "--epochs", "0",
                           "-o", str(out), "--report", str(report), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("ctprune: error: out of memory"), proc.stderr[-3000:]
    assert "needs about" in lines[0] and "GB" in lines[0] and "ulimit -v" in lines[0], lines[0]
    assert not out.exists() and not report.exists()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()), list(tmp_path.iterdir())
