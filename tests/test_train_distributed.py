"""Two processes with gloo (what `torchrun --nproc-per-node 2` sets up) train to the same result as one process."""

import os
import socket
import subprocess
import sys
import textwrap

import torch

# One copy of the run; the environment decides whether it is distributed. No dropout or BN, so the only difference
# between 1 and 2 processes is the order of floating-point sums in the gradient all-reduce.
SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from ctprune.train import Dataset, fine_tune, synthetic_data
    from ctprune.train import distributed as du

    def net(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4))
        with torch.no_grad():
            model[6].weight.mul_(8.0)
        return model

    torch.set_num_threads(1)
    teacher, student = net(0), net(1)
    data = synthetic_data((None, 1, 8, 8), 192, seed=1)
    with torch.no_grad():
        data.y = teacher(torch.from_numpy(data.x)).argmax(1).numpy()
    out = sys.argv[1]
    result = fine_tune(student, teacher, train=data, eval=data, epochs=2, batch_size=32, lr=0.05, quiet=True,
                       checkpoint_dir=out + ".ckpt")
    torch.save({"state": student.state_dict(), "accuracy": result.accuracy, "world": result.world_size},
               f"{out}.rank{du.rank()}.pt")
    du.cleanup()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "single")], env=base)]
    for rank in range(2):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "ddp")], env=env))
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]

    single = torch.load(tmp_path / "single.rank0.pt")
    ranks = [torch.load(tmp_path / f"ddp.rank{r}.pt") for r in range(2)]
    assert single["world"] == 1 and ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["accuracy"] >= single["accuracy"] - 0.02
    assert ranks[0]["accuracy"] > 0.5
    for name, want in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][name], want, rtol=1e-4, atol=1e-5)
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name])  # DDP keeps ranks identical
    # Only rank 0 wrote the checkpoint.
    assert sorted(p.name for p in (tmp_path / "ddp.ckpt").iterdir()) == ["train_state.pt"]
