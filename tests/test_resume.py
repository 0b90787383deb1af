"""A distillation run killed with SIGKILL mid-epoch resumes, rerun with the same command, to exactly the
weights, optimizer state, data position and logged losses of an uninterrupted run.

Every case trains RESUME_UPDATES updates (across the end of epoch 1, 29 updates of the toy corpus),
saving ``checkpoint_last.pt`` every SAVE_EVERY updates. The killed run gets SIGKILL once it has saved
at update SAVE_EVERY and logged update SAVE_EVERY + 2, so it dies inside a later update; the rerun
starts from update SAVE_EVERY (fairseq's ``train_iterator`` state: epoch and position in it; each
update is seeded with seed + update number) and must end where the uninterrupted run ends.
"""
import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Sequence

import pytest
import torch
from cli_runner import BIN, TIMING_METRICS, run

from fairseq_pdd.cli import user_dir
from fairseq_pdd.data.toy_mt import TINY_TRAINING, TINY_TRANSFORMER
from fairseq_pdd.teachers.checkpoints import load_checkpoint

RESUME_UPDATES = 34
SAVE_EVERY = 10
PD_END2 = ["--task", "distillation", "--criterion", "rkl_dirichlet_proxy_distillation"]
#: the teachers' temperature falls from 3 to 1 across the kill (updates 5 to 25); the logged
#: ``teacher_temperature`` of every update must match. (A teacher cache refuses annealing.)
ANNEALING = ["--init-temp", "3", "--anneal-start", "5", "--anneal-end", "25"]
SELF_DISTILLATION = ["--task", "distillation", "--criterion", "gt_mixed_self_distillation", "--gt-weight", "0.5"]
BDISTIL_ROUND_2 = ["--task", "distillation", "--criterion", "bdistil_residual_kd", "--arch", "bdistil_transformer",
                   "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32",
                   "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
                   "--bdistil-connection", "last-hidden"]


def command(data: str, save_dir: str, extra: Sequence[str]) -> List[str]:
    return [os.path.join(BIN, "fairseq-train"), data, "--user-dir", user_dir(), *TINY_TRANSFORMER, *TINY_TRAINING,
            "--seed", "3", "--max-update", str(RESUME_UPDATES), "--save-interval-updates", str(SAVE_EVERY),
            "--keep-interval-updates", "1", "--log-format", "json", "--log-interval", "1", "--save-dir", save_dir,
            *map(str, extra)]


ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@dataclass
class Run:
    log: str
    seconds: float
    killed_at: int = 0  #: the last update the killed run logged before SIGKILL


def train(cmd: List[str], cwd: str) -> Run:
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return Run(proc.stdout + proc.stderr, time.monotonic() - start)


def train_until_killed(cmd: List[str], cwd: str) -> Run:
    """Run ``cmd``; SIGKILL it once it has saved at update SAVE_EVERY and logged update SAVE_EVERY + 2."""
    start, lines, saved, update = time.monotonic(), [], False, 0
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            lines.append(line)
            saved = saved or f"@ {SAVE_EVERY} updates" in line and "Saved checkpoint" in line
            record = json_record(line, "train_inner")
            if record:
                update = int(record["num_updates"])
                if saved and update >= SAVE_EVERY + 2:
                    proc.send_signal(signal.SIGKILL)
                    break
    finally:
        proc.stdout.close()
        returncode = proc.wait()
    assert returncode == -signal.SIGKILL, f"not killed ({returncode}):\n{''.join(lines)[-3000:]}"
    return Run("".join(lines), time.monotonic() - start, update)


def json_record(line: str, kind: str):
    start = line.find("{")
    if f"| {kind} |" not in line or start < 0:
        return None
    return json.loads(line[start:])


def records(log: str, kind: str) -> List[dict]:
    """The ``--log-format json`` records of ``kind`` (train_inner, train, valid), timing metrics dropped."""
    out = []
    for line in log.splitlines():
        record = json_record(line, kind)
        if record is not None:
            out.append({k: v for k, v in record.items() if k.split("_", 1)[-1] not in TIMING_METRICS})
    return out


def assert_same_state(actual, expected, name: str) -> None:
    """Nested checkpoint state: tensors equal to rtol 1e-6, everything else exactly."""
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0, msg=name)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), name
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{name}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), name
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_state(a, e, f"{name}[{i}]")
    else:
        assert actual == expected, (name, actual, expected)


def kill_and_resume(data: str, root: str, name: str, extra: Sequence[str]) -> dict:
    """The uninterrupted run beside the killed one, then the rerun; asserts they end the same, returns the figures."""
    folders = {kind: os.path.join(root, name, kind) for kind in ("whole", "resumed")}
    with ThreadPoolExecutor(max_workers=1) as pool:
        whole = pool.submit(train, command(data, folders["whole"], extra), root)
        killed = train_until_killed(command(data, folders["resumed"], extra), root)
        whole = whole.result()
    resumed = train(command(data, folders["resumed"], extra), root)
    assert f"Loaded checkpoint {folders['resumed']}/checkpoint_last.pt (epoch 1 @ {SAVE_EVERY} updates)" in resumed.log

    final = {kind: load_checkpoint(os.path.join(folder, "checkpoint_last.pt")) for kind, folder in folders.items()}
    assert final["whole"]["optimizer_history"][-1]["num_updates"] == RESUME_UPDATES
    for key in ("model", "last_optimizer_state"):
        assert_same_state(final["resumed"][key], final["whole"][key], key)
    # (each (re)start appends an entry to the history; the last one holds the scheduler's state)
    assert_same_state(final["resumed"]["optimizer_history"][-1], final["whole"]["optimizer_history"][-1], "history")
    state = {kind: final[kind]["extra_state"] for kind in final}
    for key in ("train_iterator", "val_loss", "best"):  # the data position: epoch 2, its 5th batch
        assert state["resumed"][key] == state["whole"][key], key
    assert state["whole"]["train_iterator"]["epoch"] == 2

    # the logged losses of every update after the saved one, and of every validation
    after = [r for r in records(whole.log, "train_inner") if int(r["num_updates"]) > SAVE_EVERY]
    assert len(after) == RESUME_UPDATES - SAVE_EVERY
    assert records(resumed.log, "train_inner") == after
    assert records(resumed.log, "valid") == records(whole.log, "valid")[-len(records(resumed.log, "valid")):]
    assert records(resumed.log, "train") == records(whole.log, "train")  # epoch averages: fairseq restores the meters
    figures = {"killed at update": killed.killed_at, "final loss": after[-1]["loss"],
               "seconds lost": round(killed.seconds + resumed.seconds - whole.seconds, 1),
               "uninterrupted seconds": round(whole.seconds, 1)}
    print(name, figures)
    return figures


@pytest.fixture(scope="module")
def top8_cache(toy_mt):
    cache = os.path.join(toy_mt.root, "resume_cache_top8")
    run("python", ["-m", "fairseq_pdd.teachers.build_cache", toy_mt.data, "--ensemble-paths", ":".join(toy_mt.teachers),
                   "--cache-dir", cache, "--cpu", "--max-tokens", "2000", "--no-progress-bar",
                   "--gen-subset", "train,valid", "--topk", "8"], toy_mt.root)
    return cache


def test_pd_end2_with_online_teachers_resumes_exactly(toy_mt):
    kill_and_resume(toy_mt.data, toy_mt.root, "resume_online",
                    [*PD_END2, "--ensemble-paths", ":".join(toy_mt.teachers), *ANNEALING])


def test_pd_end2_from_the_teacher_cache_resumes_exactly(toy_mt, top8_cache):
    kill_and_resume(toy_mt.data, toy_mt.root, "resume_cache", [*PD_END2, "--teacher-cache", top8_cache])


def test_self_distillation_step_resumes_exactly(toy_mt):
    kill_and_resume(toy_mt.data, toy_mt.root, "resume_self_distillation",
                    [*SELF_DISTILLATION, "--ensemble-paths", toy_mt.teachers[0]])


def test_bdistil_round_resumes_exactly(toy_mt):
    """Round 2 on top of a frozen member 1 (a teacher), with a last-hidden connection."""
    kill_and_resume(toy_mt.data, toy_mt.root, "resume_bdistil",
                    [*BDISTIL_ROUND_2, "--ensemble-paths", ":".join(toy_mt.teachers),
                     "--bdistil-members", toy_mt.teachers[0]])


def test_killed_generate_leaves_no_partial_output_and_a_rerun_writes_it_all(toy_mt, tmp_path):
    """fairseq-pdd-generate killed mid-decode leaves only ``.tmp`` files beside the outputs' names; the
    same command again writes both outputs whole."""
    results = str(tmp_path / "results")
    cmd = [os.path.join(BIN, "fairseq-pdd-generate"), toy_mt.data, "--user-dir", user_dir(),
           "--path", ":".join(toy_mt.teachers), "--beam", "5", "--batch-size", "1", "--cpu", "--results-path", results]
    outputs = [os.path.join(results, name) for name in ("generate-test.txt", "uncertainty-test.jsonl")]
    proc = subprocess.Popen(cmd, cwd=toy_mt.root, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        decoded = 0
        while decoded < 5 and proc.poll() is None:  # kill after the 5th of 100 sentences
            time.sleep(0.05)
            if os.path.exists(outputs[0] + ".tmp"):
                with open(outputs[0] + ".tmp") as f:
                    decoded = sum(line.startswith("H-") for line in f)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    assert not any(os.path.exists(path) for path in outputs)
    assert all(os.path.exists(path + ".tmp") for path in outputs)

    subprocess.run(cmd, cwd=toy_mt.root, env=ENV, check=True, capture_output=True)
    assert sorted(os.listdir(results)) == sorted(os.path.basename(path) for path in outputs)
    with open(outputs[0]) as f:
        text = f.read()
    assert len(re.findall(r"^H-\d+\t", text, re.M)) == 100 and "BLEU" in text.splitlines()[-1]
    with open(outputs[1]) as f:
        assert sorted(json.loads(line)["id"] for line in f) == list(range(100))
