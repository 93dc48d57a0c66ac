"""Training beyond one CPU process: data-parallel ranks under torchrun (gloo on the CPU) hold
identical weights, and their checkpoint resumes with another number of processes; a GPU
(`--device cuda`) where one exists."""
import dataclasses
import json
import socket
import subprocess
import sys

import pytest
import torch

from bfn_codec.train import Trainer

from conftest import TINY_SAR, tiny_train_config

SMALL = dataclasses.replace(TINY_SAR, d_model=32, n_layers=1, n_heads=2, step_d_model=16)
SEQ = SMALL.context_len                # bytes per training sequence

# bfn-train's command line, with every rank saving its weights to OUT/rank<r>.pt when it is done
DUMP = """
import sys, torch
from bfn_codec import train
from bfn_codec.train_cli import train_cmd
run = train.Trainer.run
def run_and_dump(self, *args):
    run(self, *args)
    torch.save({"net": self.net.state_dict(), "ema": self.ema.state_dict(), "step": self.step,
                "world": self.world}, self.out / f"rank{self.rank}.pt")
train.Trainer.run = run_and_dump
train_cmd(sys.argv[1:])
"""


def config(corpus, **kw):
    return tiny_train_config(corpus, batch_size=4, chunk_lens="1,2", aux_ce=1.0, **kw)


def flags(*configs):
    """Command-line flags for every field of the configs."""
    out = []
    for cfg in configs:
        for name, value in dataclasses.asdict(cfg).items():
            flag = name.replace("_", "-")
            out += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    return out


def torchrun(n, out, *args):
    """`torchrun --nproc_per_node n bfn-train out args` on 127.0.0.1 and a free port -> each rank's dump."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(port), "--no-python", sys.executable, "-c", DUMP, str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(n)]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_hold_identical_weights_and_resume_with_one(tmp_path, corpus):
    out = tmp_path / "run"
    ranks = torchrun(2, out, *flags(SMALL, config(corpus, max_steps=4)))
    assert [r["step"] for r in ranks] == [4, 4] and ranks[0]["world"] == 2
    assert same(ranks[0]["net"], ranks[1]["net"]) and same(ranks[0]["ema"], ranks[1]["ema"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert same(ckpt["model"], ranks[0]["net"])
    assert ckpt["bytes_seen"] == 2 * 4 * 4 * SEQ                  # both ranks' batches
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [0, 4]                    # rank 0 alone logs
    alone = Trainer(tmp_path / "alone", SMALL, config(corpus, max_steps=4))
    alone.run()                                                  # rank 0's batches only: other weights
    assert not same(alone.net.state_dict(), ranks[0]["net"])

    resumed = Trainer(out, SMALL, config(corpus, max_steps=6))   # one process from here
    assert (resumed.step, resumed.world) == (4, 1) and same(resumed.net.state_dict(), ranks[0]["net"])
    resumed.run()
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[-1]["step"] == 6 and log[-1]["bytes"] == (2 * 4 + 2) * 4 * SEQ


def test_one_process_checkpoint_resumes_with_two(tmp_path, corpus):
    out = tmp_path / "run"
    Trainer(out, SMALL, config(corpus, max_steps=2)).run()
    ranks = torchrun(2, out, "--max-steps", "4")                 # the rest from the checkpoint
    assert [r["step"] for r in ranks] == [4, 4]
    assert same(ranks[0]["net"], ranks[1]["net"]) and same(ranks[0]["ema"], ranks[1]["ema"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["bytes_seen"] == (2 + 2 * 2) * 4 * SEQ


def test_device_and_compile_may_change_on_resuming(tmp_path, corpus):
    out = tmp_path / "run"
    Trainer(out, SMALL, config(corpus, max_steps=1)).run()
    resumed = Trainer(out, SMALL, config(corpus, max_steps=2, compile=True, device="cpu"), {"compile", "device"})
    assert resumed.tcfg.compile and type(resumed.loss.net).__name__ == "OptimizedModule"
    assert resumed.net.head.weight.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_trains_and_its_checkpoint_resumes_on_the_cpu(tmp_path, corpus):
    out = tmp_path / "run"
    trainer = Trainer(out, SMALL, config(corpus, max_steps=3, device="cuda"))
    assert trainer.net.head.weight.is_cuda and trainer.ema.head.weight.is_cuda
    trainer.run()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)          # no map_location: CPU tensors
    assert all(not t.is_cuda for t in list(ckpt["model"].values()) + list(ckpt["ema"].values()))
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[-1]["step"] == 3 and log[-1]["val_total10"] < 9
    resumed = Trainer(out, SMALL, config(corpus, max_steps=5, device="cpu"))
    assert resumed.step == 3 and not resumed.net.head.weight.is_cuda
    resumed.run()
    assert resumed.step == 5
