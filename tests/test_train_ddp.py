"""Distributed training: ``torchrun --nproc_per_node=2 -m gptfast train`` (gloo on the CPU, loopback only)
reaches the loss of one process reading the same global batch; so does
``--fsdp``, whose checkpoint resumes on one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from gptfast.cli import main
from gptfast.data import write_shards

FLAGS = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "4", "--context-length", "16", "--drop-rate", "0",
         "--steps", "6", "--eval-every", "3", "--eval-iters", "2", "--warmup", "2", "--lr", "3e-3",
         "--no-progress", "--sample-tokens", "0"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch was built without torch.distributed")
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    rng = np.random.default_rng(0)
    docs = [np.tile(rng.integers(0, 255, size=5), 80) for _ in range(3)]
    shards = tmp_path / "shards"
    write_shards(docs, str(shards), "gpt2", 256, 255)
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "gptfast", "train", str(shards), "--out", two, "--batch-size", "2", *FLAGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(shards), "--out", one, "--batch-size", "4", *FLAGS]) == 0
    finally:
        torch.set_num_threads(n)
    a, b = _metrics(two), _metrics(one)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):  # same windows, gradients averaged by DDP: equal up to fp32 summation order
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-5)
    assert a[-1]["val_loss"] == pytest.approx(b[-1]["val_loss"], abs=1e-5)
    assert a[-1]["train_loss"] < a[0]["train_loss"]
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # rank 0 alone wrote the run folder
    # FSDP: the same loss, and its checkpoint (gathered to rank 0) resumes on one process to the same end
    fsdp = str(tmp_path / "fsdp")
    cmd[cmd.index(two)] = fsdp
    cmd[cmd.index("--steps") + 1] = "3"
    proc = subprocess.run(cmd + ["--fsdp"], env=env, capture_output=True, text=True, timeout=120)
    if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 7):
        assert proc.returncode != 0 and "fsdp on CPU processes needs torch >= 2.7" in proc.stderr, proc.stderr[-3000:]
        pytest.skip(reason=f"FSDP on CPU processes needs torch >= 2.7; this is torch {torch.__version__} "
                           "(DDP was checked above, and --fsdp is refused with a clear error)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _metrics(fsdp)[-1]["train_loss"] == pytest.approx(b[2]["train_loss"], abs=1e-5)
    torch.set_num_threads(1)
    try:
        assert main(["train", str(shards), "--out", fsdp, "--batch-size", "4", "--resume", *FLAGS]) == 0
    finally:
        torch.set_num_threads(n)
    assert _metrics(fsdp)[-1]["train_loss"] == pytest.approx(b[-1]["train_loss"], abs=1e-5)
