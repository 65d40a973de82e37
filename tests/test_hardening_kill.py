"""SIGKILL at random moments of a real `ctprune` run never leaves a partial output and never touches the input
(issue 18, item 7). Ctrl-C then --resume finishing with the uninterrupted run's weights is test_cli_resume.py.

Each run is the console script in a child process on the bundled ResNet-20 with one epoch on a small .npz, killed
after a random delay (fresh seed each session, printed so a failure can be replayed with CTPRUNE_KILL_SEED). What may
be left: nothing, a complete output and report, or a checkpoint folder; never a truncated model or report."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.hardening_cases import digest

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "examples" / "models" / "resnet20_fmnist.onnx"
KILLS = 5
BUDGET_S = 60.0  # all runs together

pytestmark = pytest.mark.skipif(not MODEL.exists(), reason="examples/models/resnet20_fmnist.onnx is not there")


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("ctprune")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ctprune"]


def _complete(path: Path, kind: str) -> None:
    if kind == "model":
        onnx.checker.check_model(onnx.load(path))
    else:
        json.loads(path.read_text())


def _kill(proc, rng, moment, folder: Path, target: Path) -> tuple[bool, str]:
    """SIGKILL `proc` at `moment`; (whether it finished first, when it was killed)."""
    start = time.monotonic()
    if moment == "time":
        delay = rng.uniform(0.5, 9.0)
        try:
            proc.wait(timeout=delay)
            return True, "finished first"
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return False, f"{delay:.2f}s"
    prefix = "." + target.name + "."
    while proc.poll() is None:
        if any(name.startswith(prefix) for name in os.listdir(folder)):
            time.sleep(rng.uniform(0.0, 0.002))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return False, f"{time.monotonic() - start:.2f}s, writing {target.name}"
        time.sleep(0.0005)
    return True, "finished first"


def test_sigkill_never_leaves_a_partial_output(tmp_path):
    seed = int(os.environ.get("CTPRUNE_KILL_SEED", random.SystemRandom().randrange(1 << 30)))
    rng = random.Random(seed)
    rng_data = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng_data.standard_normal((48, 1, 28, 28)).astype(np.float32),
             y=rng_data.integers(0, 10, 48).astype(np.int64))
    inputs = {MODEL: digest(MODEL), data: digest(data)}
    started = time.monotonic()
    outcomes = []
    # three kills at random times; two the moment the output's or the report's temporary file appears (the writes
    # themselves take milliseconds: a random time would almost never land in them)
    moments = ["time", "time", "time", "writing model", "writing report"]
    rng.shuffle(moments)
    for i, moment in enumerate(moments):
        out, report = tmp_path / f"out{i}.onnx", tmp_path / f"out{i}.json"
        proc = subprocess.Popen(_console_script() + [str(MODEL), "--ratio", "8x", "--epochs", "1", "--data", str(data),
                                                     "--batch-size", "16", "-o", str(out), "--report", str(report),
                                                     "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        finished, when = _kill(proc, rng, moment, tmp_path, out if moment == "writing model" else report)
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        if finished:
            assert proc.returncode == 0, f"seed {seed}: the run failed on its own: {err[-2000:]}"
        outcomes.append((moment, when, out.exists(), report.exists()))
        for path, kind in ((out, "model"), (report, "report")):
            if path.exists():
                _complete(path, kind)  # a file under the final name is always whole
        for path, before in inputs.items():
            assert digest(path) == before, f"seed {seed}: run {i} changed {path}"
        assert time.monotonic() - started < BUDGET_S * 2, f"seed {seed}: the kill runs are far too slow ({outcomes})"
    print(f"CTPRUNE_KILL_SEED={seed}: {outcomes}")
