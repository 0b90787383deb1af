"""Distributed training through fairseq's own torch.distributed code, launched by the recipes' ``train``.

Two CPU processes (gloo, fairseq's ``legacy_ddp``), each taking every other batch, must train exactly
like one process accumulating the same two batches per update (``--update-freq 2``): the same logged
train and valid metrics (fairseq all-reduces the criterion's logging outputs) and the same weights.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from cli_runner import BIN
from fairseq_pdd.checkpoints import load_checkpoint
from fairseq_pdd.toy_data import TINY_TRAINING, TINY_TRANSFORMER

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: metrics that depend on wall time or on the number of processes, not on the math
TIMING = {"wps", "ups", "wpb", "bsz", "wall", "train_wall", "gb_free", "cuda_gb_allocated"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_train(cwd, ngpu, args):
    """``train ARGS`` from recipes/lib.sh with DEVICE=cpu NGPU=ngpu; returns its stdout+stderr."""
    options = [a for a in TINY_TRAINING if a != "--cpu"]  # train() adds --cpu
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], DEVICE="cpu", NGPU=str(ngpu),
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    script = 'source "$0"; train "$@"'
    proc = subprocess.run(["bash", "-c", script, os.path.join(REPO, "recipes", "lib.sh"), *TINY_TRANSFORMER,
                           *options, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def logged(output, kind):
    """The epoch-level JSON records of ``kind`` ('train' or 'valid'), timing fields dropped."""
    records = []
    for line in output.splitlines():
        start = line.find("{")
        if f"| {kind} |" in line and start >= 0:
            record = json.loads(line[start:])
            records.append({k: v for k, v in record.items() if k.split("_", 1)[-1] not in TIMING})
    return records


@pytest.mark.parametrize("criterion", ["rkl_dirichlet_proxy_distillation"])
def test_two_gloo_processes_train_like_one(toy_mt, tmp_path, criterion):
    common = [toy_mt.data, "--task", "distillation", "--ensemble-paths", ":".join(toy_mt.teachers),
              "--criterion", criterion, "--dropout", "0", "--max-epoch", "2", "--seed", "3",
              "--log-format", "json", "--required-batch-size-multiple", "1", "--max-tokens", "1000"]
    one = recipe_train(str(tmp_path), 1, [*common, "--update-freq", "2", "--save-dir", str(tmp_path / "one")])
    two = recipe_train(str(tmp_path), 2, [*common, "--save-dir", str(tmp_path / "two")])
    assert "distributed init (rank 1)" in two and "distributed init" not in one

    for kind in ("train", "valid"):
        single, multi = logged(one, kind), logged(two, kind)
        assert len(single) == 2 and single == multi, (kind, single, multi)
    assert any("ensemble_precision" in k for k in logged(one, "train")[0])  # the criterion's own metrics

    weights = [load_checkpoint(str(tmp_path / run / "checkpoint_last.pt"))["model"]
               for run in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_dry_run_prints_the_multi_node_command(tmp_path):
    """DRY_RUN=1 prints, on node 1 of 2 with 4 GPUs each, one fairseq-train whose first rank is 4."""
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], DRY_RUN="1", NGPU="4", NNODES="2",
               NODE_RANK="1", MASTER_ADDR="node0", MASTER_PORT="1234")
    proc = subprocess.run(["bash", "-c", 'source "$0"; train data-bin --arch transformer',
                           os.path.join(REPO, "recipes", "lib.sh")], env=env, capture_output=True, text=True,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("+ ")]
    assert len(lines) == 1
    assert "fairseq-train data-bin --arch transformer --user-dir " in lines[0]
    assert lines[0].endswith("--distributed-world-size 8 --distributed-init-method tcp://node0:1234 "
                             "--distributed-rank 4")
    assert not os.listdir(tmp_path)  # nothing ran
