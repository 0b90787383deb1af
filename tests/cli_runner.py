"""Run fairseq's real command-line tools in subprocesses, as a user would."""
import json
import os
import re
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import List, Sequence

import torch

from fairseq_pdd.teachers.checkpoints import load_checkpoint
from fairseq_pdd.cli import user_dir
from fairseq_pdd.data.toy_mt import TINY_TRAINING, TINY_TRANSFORMER

BIN = os.path.dirname(sys.executable)

class CommandFailed(AssertionError):
    pass


def run(tool: str, args: Sequence[str], cwd: str, expect_failure: bool = False) -> subprocess.CompletedProcess:
    """Run ``tool`` from the venv's bin directory; fail the test with its output if it fails."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [os.path.join(BIN, tool), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True
    )
    if expect_failure:
        if proc.returncode == 0:
            raise CommandFailed(f"{tool} succeeded but was expected to fail:\n{proc.stderr[-3000:]}")
    elif proc.returncode != 0:
        raise CommandFailed(f"{tool} {' '.join(map(str, args))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def preprocess(raw_dir: str, dest: str, cwd: str, extra: Sequence[str] = ()) -> str:
    run(
        "fairseq-preprocess",
        ["--source-lang", "src", "--target-lang", "tgt",
         "--trainpref", f"{raw_dir}/train", "--validpref", f"{raw_dir}/valid", "--testpref", f"{raw_dir}/test",
         "--destdir", dest, "--joined-dictionary", "--workers", "1", *extra],
        cwd,
    )
    return dest


def train(data: str, save_dir: str, cwd: str, extra: Sequence[str], expect_failure: bool = False):
    """fairseq-train with the tiny model; returns the process (stdout has the log)."""
    return run(
        "fairseq-train",
        [data, "--user-dir", user_dir(), *TINY_TRANSFORMER, *TINY_TRAINING, "--save-dir", save_dir, *extra],
        cwd,
        expect_failure,
    )


STUDENT_EPOCHS = 12  #: of the students of conftest.students


def distil(toy_mt, criterion: str, name: str, epochs: int, extra: Sequence[str] = ()):
    """A student trained with ``criterion`` on the ``toy_mt`` teachers (seed 3) into ``toy_mt.root/name``;
    returns (checkpoint, log)."""
    save = os.path.join(toy_mt.root, name)
    proc = train(toy_mt.data, save, toy_mt.root,
                 ["--task", "distillation", "--ensemble-paths", ":".join(toy_mt.teachers),
                  "--criterion", criterion, "--max-epoch", str(epochs), "--seed", "3", *extra])
    return os.path.join(save, "checkpoint_last.pt"), proc.stdout + proc.stderr


def valid_losses(log: str) -> List[float]:
    """The per-epoch validation losses from a fairseq-train log."""
    return [float(x) for x in re.findall(r"valid on 'valid' subset \| loss ([-\d.]+)", log)]


def last_valid(log: str, key: str, subset: str = "valid") -> float:
    """``key`` on the last ``valid on 'SUBSET' subset`` line of a fairseq-train log."""
    lines = [line for line in log.splitlines() if f"valid on '{subset}' subset" in line]
    assert lines, f"no validation line in the log:\n{log[-2000:]}"
    match = re.search(rf"\| {key} ([-\d.]+)", lines[-1])
    assert match, f"no {key} on the last validation line: {lines[-1]}"
    return float(match.group(1))


def generate_bleu(data: str, path: str, cwd: str, extra: Sequence[str] = ()) -> float:
    """fairseq-generate with beam 5 and sacrebleu over every test sentence; returns the BLEU score."""
    proc = run(
        "fairseq-generate",
        [data, "--user-dir", user_dir(), "--path", path, "--beam", "5", "--batch-size", "64",
         "--required-batch-size-multiple", "1", "--scoring", "sacrebleu", "--cpu", *extra],
        cwd,
    )
    match = re.search(r"BLEU = ([\d.]+)", proc.stdout + proc.stderr)
    assert match, f"no BLEU line in fairseq-generate output:\n{proc.stdout[-2000:]}"
    return float(match.group(1))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe_env(**overrides) -> dict:
    """The environment of a recipe script (recipes/*/run.sh): this venv's tools, this checkout's plugin."""
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], PYTHONPATH=REPO, PYTHON=sys.executable,
               USER_DIR=user_dir(), OMP_NUM_THREADS="1")
    env.update(overrides)
    return env


def run_recipe(recipe: str, cwd: str, env: dict) -> str:
    """``bash recipes/RECIPE/run.sh`` in ``cwd``; fails the test with its output if it fails; stdout + stderr."""
    proc = subprocess.run(["bash", os.path.join(REPO, "recipes", recipe, "run.sh")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


#: settings a recipe test's environment may carry; a dry run at the paper's defaults removes them
TEST_SETTINGS = ("NGPU", "DEVICE", "M", "SEEDS", "MODEL_ARGS", "EXTRA", "CRITERIA", "LIBRISPEECH")


def dry_run_recipe(recipe: str, cwd: str, **overrides) -> str:
    """``DRY_RUN=1 WORK=work bash recipes/RECIPE/run.sh`` at the recipe's defaults plus ``overrides``;
    fails the test if it fails or creates anything in ``cwd``; its stderr (the printed commands)."""
    before = sorted(os.listdir(cwd))
    env = recipe_env(DRY_RUN="1", WORK="work")
    for name in TEST_SETTINGS:
        env.pop(name, None)
    env.update(overrides)
    proc = subprocess.run(["bash", os.path.join(REPO, "recipes", recipe, "run.sh")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(os.listdir(cwd)) == before, "the dry run created files"
    return proc.stderr


def rerun_commands(recipe: str, cwd: str, env: dict) -> List[str]:
    """The commands a second run of a finished recipe runs (none, when every step is resumable)."""
    log = run_recipe(recipe, cwd, env)
    assert "(done:" in log
    return [line for line in log.splitlines() if line.startswith("+ ")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lib_train(cwd: str, processes: int, args: Sequence[str]) -> str:
    """``train ARGS`` of recipes/lib.sh with DEVICE=cpu NGPU=processes (gloo when > 1), the tiny
    Transformer and its CPU options; fails the test if it fails; stdout + stderr."""
    options = [a for a in TINY_TRAINING if a != "--cpu"]  # train() adds --cpu
    env = recipe_env(DEVICE="cpu", NGPU=str(processes), MASTER_PORT=str(free_port()))
    proc = subprocess.run(["bash", "-c", 'source "$0"; train "$@"', os.path.join(REPO, "recipes", "lib.sh"),
                           *TINY_TRANSFORMER, *options, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


#: logged metrics that depend on wall time or on the number of processes, not on the math
TIMING_METRICS = {"wps", "ups", "wpb", "bsz", "wall", "train_wall", "gb_free", "cuda_gb_allocated"}


def epoch_records(output: str, kind: str) -> List[dict]:
    """The epoch-level ``--log-format json`` records of ``kind`` ('train' or 'valid'), timing dropped."""
    records = []
    for line in output.splitlines():
        start = line.find("{")
        if f"| {kind} |" in line and start >= 0:
            record = json.loads(line[start:])
            records.append({k: v for k, v in record.items() if k.split("_", 1)[-1] not in TIMING_METRICS})
    return records


def assert_two_processes_train_like_one(data, work, args):
    """``args`` trained by 2 gloo processes == by 1 process with --update-freq 2 (metrics and weights)."""
    common = [data, "--dropout", "0", "--max-epoch", "2", "--seed", "3", "--log-format", "json",
              "--required-batch-size-multiple", "1", "--max-tokens", "1000", *args]
    with ThreadPoolExecutor(max_workers=1) as pool:  # the 1-process run beside the 2-process one
        one = pool.submit(lib_train, work, 1, [*common, "--update-freq", "2", "--save-dir", os.path.join(work, "one")])
        two = lib_train(work, 2, [*common, "--save-dir", os.path.join(work, "two")])
        one = one.result()
    assert "distributed init (rank 1)" in two and "distributed init" not in one
    for kind in ("train", "valid"):
        single, multi = epoch_records(one, kind), epoch_records(two, kind)
        assert len(single) == 2 and single == multi, (kind, single, multi)
    weights = [load_checkpoint(os.path.join(work, name, "checkpoint_last.pt"))["model"] for name in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-5, atol=1e-6, msg=name)
    return epoch_records(one, "train")


# speech ----------------------------------------------------------------------------------------------
ASR_SIZES = {"train": 200, "dev": 20, "test": 40}  #: utterances per subset of the toy speech corpus
ASR_N_OOD = 40
ASR_EPOCHS = "8"
ASR_DECODE = ["--beam", "5", "--batch-size", "64", "--required-batch-size-multiple", "1", "--scoring", "wer", "--cpu"]


def asr_train(data: str, save_dir: str, cwd: str, extra: Sequence[str], expect_failure: bool = False):
    """fairseq-train with the tiny VGG-Transformer on prepared speech data."""
    from fairseq_pdd.data import toy_asr

    return run("fairseq-train", [data, "--user-dir", user_dir(), *toy_asr.TINY_VGG_TRANSFORMER,
                                 *toy_asr.TINY_ASR_TRAINING, "--save-dir", save_dir, *extra], cwd, expect_failure)


def asr_generate(tool: str, data: str, path: str, subset: str, cwd: str, extra: Sequence[str] = (),
                 expect_failure: bool = False):
    """``tool`` (fairseq-generate or fairseq-pdd-generate) with WER scoring on ``subset``."""
    return run(tool, [data, "--user-dir", user_dir(), "--task", "speech_to_text", "--path", path,
                      "--gen-subset", subset, *ASR_DECODE, *extra], cwd, expect_failure)


def asr_wer(stdout: str, subset: str = "test") -> float:
    """The WER fairseq's scorer printed for ``subset``."""
    match = re.search(rf"Generate {subset} with beam=5: WER: ([\d.]+)", stdout)
    assert match, f"no WER line in:\n{stdout[-2000:]}"
    return float(match.group(1))
