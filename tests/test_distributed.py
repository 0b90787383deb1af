"""Distributed training through fairseq's own torch.distributed code, launched by the recipes' ``train``.

Two CPU processes (gloo, fairseq's ``legacy_ddp``), each taking every other batch, must train exactly
like one process accumulating the same two batches per update (``--update-freq 2``): the same logged
train and valid metrics (fairseq all-reduces the criterion's logging outputs) and the same weights.
"""
import os
import subprocess

from cli_runner import BIN, REPO, assert_two_processes_train_like_one


def test_two_gloo_processes_train_like_one(toy_mt, tmp_path):
    records = assert_two_processes_train_like_one(
        toy_mt.data, str(tmp_path),
        ["--task", "distillation", "--ensemble-paths", ":".join(toy_mt.teachers),
         "--criterion", "rkl_dirichlet_proxy_distillation"])
    assert any("ensemble_precision" in k for k in records[0])  # the criterion's own metrics


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
