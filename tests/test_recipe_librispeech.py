"""The LibriSpeech recipe (recipes/librispeech/) run for real on a tiny synthetic corpus on CPU, and its dry run.

The toy speech of ``fairseq_pdd.data.toy_asr`` is written under LibriSpeech's subset names, so every
stage script runs as on the real corpus: fbank80 + sentencepiece preparation (dev-clean extracted from
its "downloaded" archive), two VGG-Transformer teachers (speech_to_text), a PD-EnD2 student
(asr_distillation), fairseq-pdd-generate with WER on test-clean and two OOD sets, test-other (new
speakers) and an OOD corpus ``foreign`` prepared with LibriSpeech's vocabulary (toy words never seen
in training, in another frequency band: the toy analogue of another language), and
fairseq-pdd-evaluate --task asr. Only the sizes (model, vocabulary, epochs, beam) shrink.
"""
import json
import os
import re
import subprocess
import tarfile

import pytest
from cli_runner import REPO, dry_run_recipe, recipe_env, rerun_commands, run_recipe

from fairseq_pdd.data import toy_asr as toy
from fairseq_pdd.cli import user_dir

CRITERION = "rkl_dirichlet_proxy_distillation"
SIZES = {"train-clean-100": 48, "dev-clean": 8, "test-clean": 12, "test-other": 6}
N_FOREIGN = 8


def write_librispeech_layout(root) -> None:
    """The toy corpus under LibriSpeech's subset names; dev-clean only as downloads/dev-clean.tar.gz
    (LibriSpeech/dev-clean/..., as openslr's archives), so the recipe extracts it."""
    staging = root / "staging" / "LibriSpeech"
    for k, (subset, n) in enumerate(SIZES.items()):
        folder = staging if subset == "dev-clean" else root / "LibriSpeech"
        toy.write_subset(str(folder), subset, n, seed=1 + k, first_speaker=100 * (k + 1))
    toy.write_subset(str(root / "other_corpus"), "foreign", N_FOREIGN, seed=9, first_speaker=900,
                     vocabulary=toy.OOD_WORDS, band=toy.OOD_BAND)
    os.makedirs(root / "LibriSpeech" / "downloads")
    with tarfile.open(root / "LibriSpeech" / "downloads" / "dev-clean.tar.gz", "w:gz") as tar:
        tar.add(staging, arcname="LibriSpeech")


def run_the_recipe(root):
    """The recipe run on the toy corpus in ``root``: (root, WORK, its environment, its output)."""
    write_librispeech_layout(root)
    env = recipe_env(
        WORK=str(root / "work"), LIBRISPEECH=str(root / "LibriSpeech"), LIBRISPEECH_URL="http://invalid.test",
        TRAIN_SUBSETS="train-clean-100", VALID_SUBSETS="dev-clean", VOCAB_SIZE=str(toy.TOY_VOCAB_SIZE),
        DEVICE="cpu", M="2", SEEDS="1 2", MODEL_ARGS=" ".join(toy.TINY_VGG_TRANSFORMER), NUM_WORKERS="0",
        TEACHER_MAX_TOKENS="300", TEACHER_TOKENS_PER_UPDATE="300", TEACHER_MAX_EPOCH="2",
        MAX_TOKENS="300", TOKENS_PER_UPDATE="300", MAX_EPOCH="2", LR="3e-3", WARMUP="20",
        OOD_CORPORA=str(root / "other_corpus" / "foreign"), CRITERIA=CRITERION, BEAM="3", NBEST="3", EVAL_PLOTS="0",
        EXTRA="--no-progress-bar --log-interval 20 --no-epoch-checkpoints",
    )
    log = run_recipe("librispeech", str(root), env)
    return root, root / "work", env, log


BACKGROUND = {"recipe": run_the_recipe}  #: the run starts with the session (conftest.Background)


@pytest.fixture(scope="module")
def recipe(background):
    return background.result(run_the_recipe)


def read_tsv(path):
    with open(path) as f:
        header, *rows = [line.rstrip("\n").split("\t") for line in f]
    return [dict(zip(header, r)) for r in rows]


def test_prepare_writes_every_subset_with_one_vocabulary(recipe):
    root, work, _, log = recipe
    data = work / "data"
    assert (data / "config.yaml").exists() and (data / f"spm_unigram{toy.TOY_VOCAB_SIZE}.model").exists()
    for subset, n in {**SIZES, "foreign": N_FOREIGN}.items():
        rows = read_tsv(data / f"{subset}.tsv")
        assert len(rows) == n and all((data / r["audio"]).exists() for r in rows), subset
    assert (root / "LibriSpeech" / "dev-clean").is_dir() and not (root / "LibriSpeech" / ".dev-clean.tmp").exists()
    assert "curl" not in log and "--strip-components 1 LibriSpeech/dev-clean" in log  # archive found, extracted
    assert "--vocab-size 28 --num-mel-bins 80 --sample-rate 16000 --cmvn utterance" in log
    assert f"--root {root / 'other_corpus'} --subsets foreign --out-dir {data}" in log  # after LibriSpeech's
    assert (data / "foreign.tsv").stat().st_mtime > (data / f"spm_unigram{toy.TOY_VOCAB_SIZE}.model").stat().st_mtime


def test_teachers_and_student_trained_by_the_recipe(recipe):
    _, work, _, log = recipe
    teachers = [work / "teachers" / f"teacher{i}" for i in (1, 2)]
    for seed, teacher in enumerate(teachers, start=1):
        assert (teacher / "checkpoint_best.pt").exists() and (teacher / "done").exists()
        train_log = (teacher / "train.log").read_text()
        for setting in ("task='speech_to_text'", "arch='pdd_vggtransformer_tiny'", "optimizer='adadelta'",
                        "adadelta_rho=0.95", "criterion='cross_entropy'", f"'seed': {seed},"):
            assert setting in train_log, setting
    student = work / "students" / CRITERION
    assert (student / "checkpoint_best.pt").exists() and (student / "done").exists()
    train_log = (student / "train.log").read_text()
    assert "task='asr_distillation'" in train_log and "optimizer='adam'" in train_log
    paths = ", ".join(str(t / "checkpoint_best.pt") for t in teachers)
    assert f"loaded 2 teachers (torch.float32): {paths}" in log  # the plugin logs to the console
    assert "valid on 'dev-clean' subset" in train_log and "ensemble_precision" in train_log


def test_report_has_wer_and_ood_detection(recipe):
    _, work, _, _ = recipe
    report = json.loads((work / "eval" / "test-clean" / "report.json").read_text())
    assert report["config"]["task"] == "asr"
    assert set(report["systems"]) == {"ensemble", CRITERION}
    for system in report["systems"].values():
        assert system["n_samples"] == SIZES["test-clean"]  # every utterance decoded
        assert system["quality"]["wer"] >= 0
        for ood in ("test-other", "foreign"):
            assert system["ood_quality"][ood]["wer"] >= 0
            auc = system["ood"][ood]["mutual_information"]["roc_auc"]
            assert auc is None or 0.0 <= auc <= 1.0
    for subset, n in (("test-clean", SIZES["test-clean"]), ("test-other", SIZES["test-other"]),
                      ("foreign", N_FOREIGN)):
        records = [json.loads(line) for line in open(work / "decode" / CRITERION / f"uncertainty-{subset}.jsonl")]
        assert {(r["id"], r["rank"]) for r in records} == {(i, k) for i in range(n) for k in range(-1, 3)}
        assert all("\u2581" not in r["hypothesis"] for r in records)  # sentencepiece removed before WER


def test_rerun_skips_every_finished_step(recipe):
    root, _, env, _ = recipe
    commands = rerun_commands("librispeech", str(root), env)
    assert commands == [], commands


def test_dry_run_prints_the_paper_commands_and_creates_nothing(tmp_path):
    text = dry_run_recipe("librispeech", tmp_path, OOD_CORPORA="ood/ami")
    lines = text.splitlines()
    trains = [line for line in lines if line.startswith("+ fairseq-train")]
    assert len(trains) == 3 + 2  # M teachers, PD-EnD2 and KD students
    common = ["--arch pdd_vggtransformer_2", "--config-yaml config.yaml", f"--user-dir {user_dir()}", "--fp16",
              "--train-subset train-clean-100\\,train-clean-360\\,train-other-500",
              "--valid-subset dev-clean\\,dev-other"]
    for t in trains:
        assert all(option in t for option in common), t
    for t in trains[:3]:
        assert "--task speech_to_text" in t and "--criterion cross_entropy" in t
        assert "--optimizer adadelta --lr 1.0 --adadelta-eps 1e-8 --adadelta-rho 0.95 --clip-norm 10.0" in t
        assert "--max-tokens 5000 --update-freq 1 --max-epoch 80 --keep-last-epochs 10" in t
    ensemble = ":".join(f"work/teachers/teacher{i}/checkpoint_best.pt" for i in (1, 2, 3))
    pd, kd = trains[3:]
    for t in (pd, kd):
        for option in (f"--task asr_distillation --ensemble-paths {ensemble}", "--max-tokens 8000 --update-freq 1",
                       "--max-epoch 80", "--clip-norm 1.0 --weight-decay 1e-8", "--seed 0", "--fp16-ensemble"):
            assert option in t, (option, t)
    assert "--optimizer adam --lr 1e-4 --lr-scheduler inverse_sqrt --warmup-updates 4000 --memory-efficient-fp16" in pd
    assert "--criterion rkl_dirichlet_proxy_distillation --target-concentration mkl --model-offset 0 " \
           "--target-offset 1" in pd
    assert "--optimizer adadelta --lr 0.1 " in kd and "--criterion forward_kl_mean_distillation" in kd
    assert "--memory-efficient-fp16" not in kd  # fairseq's adadelta does not support it
    # preparation: every LibriSpeech subset downloaded and prepared at once, then the OOD corpus
    assert text.count("+ curl") == 7 and "https://www.openslr.org/resources/12/train-other-500.tar.gz" in text
    assert "librispeech.py --root work/LibriSpeech --subsets train-clean-100\\,train-clean-360\\,train-other-500" \
           "\\,dev-clean\\,dev-other\\,test-clean\\,test-other --out-dir work/data --vocab-size 5000" in text
    assert "librispeech.py --root ood --subsets ami --out-dir work/data --vocab-size 5000" in text
    decodes = [line for line in lines if "fairseq-pdd-generate" in line]
    assert len(decodes) == 3 * 3  # test-clean, test-other, ami x ensemble and 2 students
    for d in decodes:
        for option in ("--task speech_to_text", "--beam 20 --nbest 20", "--scoring wer", "--uncertainty-reference",
                       "--required-batch-size-multiple 1", "--distributed-world-size 1", f"--user-dir {user_dir()}"):
            assert option in d, (option, d)
    assert "--gen-subset ami" in text and "--gen-subset test-other" in text
    evaluate = [line for line in lines if "fairseq-pdd-evaluate" in line]
    assert len(evaluate) == 1 and "--task asr" in evaluate[0] and "--in-domain uncertainty-test-clean.jsonl" in evaluate[0]
    assert "--ood test-other=uncertainty-test-other.jsonl --ood ami=uncertainty-ami.jsonl" in evaluate[0]


@pytest.mark.parametrize("settings, teachers, students", [
    ({}, (5000, 1), (8000, 1)),  # the authors' 8000 frames and fairseq's vggtransformer_2 5000, per update
    ({"MAX_TOKENS": "4000", "TEACHER_MAX_TOKENS": "2500"}, (2500, 2), (4000, 2)),  # a smaller GPU: update kept
    ({"MAX_TOKENS": "16000", "UPDATE_FREQ": "1"}, (5000, 1), (16000, 1)),  # an explicit update freq wins
])
def test_dry_run_batches_keep_the_frames_per_update(tmp_path, settings, teachers, students):
    text = dry_run_recipe("librispeech", tmp_path, STAGES="2 3", **settings)
    found = {"speech_to_text": set(), "asr_distillation": set()}
    for line in text.splitlines():
        if line.startswith("+ fairseq-train"):
            task = re.search(r"--task (\w+)", line).group(1)
            found[task].add(tuple(map(int, re.search(r"--max-tokens (\d+) --update-freq (\d+)", line).groups())))
    assert found == {"speech_to_text": {teachers}, "asr_distillation": {students}}
    assert f"{students[0]} x {students[1]} per GPU x 1 workers = {students[0] * students[1]} frames per update" in text


def test_dry_run_refuses_frames_that_do_not_divide(tmp_path):
    env = recipe_env(DRY_RUN="1", WORK="work", STAGES="3", MAX_TOKENS="3000")
    proc = subprocess.run(["bash", os.path.join(REPO, "recipes", "librispeech", "run.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "MAX_TOKENS=3000 does not divide TOKENS_PER_UPDATE=8000" in proc.stderr
    assert "fairseq-train" not in proc.stderr


def test_dry_run_with_label_smoothing_finetuning_and_annealing(tmp_path):
    """LABEL_SMOOTHING > 0 switches the teachers' criterion; EnD2 starts from the KD student, or with
    ANNEAL_CRITERIA trains from scratch with the temperature annealed (the authors' --anneal-start 0
    --anneal-end 4000)."""
    criteria = "forward_kl_mean_distillation sequence_distribution_distillation"
    text = dry_run_recipe("librispeech", tmp_path, STAGES="2 3", LABEL_SMOOTHING="0.1", CRITERIA=criteria)
    trains = [line for line in text.splitlines() if line.startswith("+ fairseq-train")]
    assert all("--criterion label_smoothed_cross_entropy --label-smoothing 0.1" in t for t in trains[:3])
    assert "--criterion sequence_distribution_distillation --model-offset 1 --finetune-from-model " \
           "work/students/forward_kl_mean_distillation/checkpoint_best.pt" in trains[4]
    assert "--optimizer adam" in trains[4] and "--init-temp" not in text
    text = dry_run_recipe("librispeech", tmp_path, STAGES="3", CRITERIA=criteria, FINETUNE_FROM_KD="",
                          ANNEAL_CRITERIA="sequence_distribution_distillation")
    kd, end2 = [line for line in text.splitlines() if line.startswith("+ fairseq-train")]
    assert "--criterion sequence_distribution_distillation --model-offset 1 --init-temp 10 --anneal-start 0 " \
           "--anneal-end 4000 --temper-student " in end2
    assert "--finetune-from-model" not in end2 and "--init-temp" not in kd


@pytest.mark.parametrize("corpus, dry, problem", [
    ("other/test-clean", "1", "OOD corpus other/test-clean: its name 'test-clean' is a LibriSpeech subset of SUBSETS"),
    ("missing/ami", "0", "OOD corpus missing/ami (OOD_CORPORA) is not a directory"),
])
def test_bad_ood_corpus_stops_before_any_work(tmp_path, corpus, dry, problem):
    env = recipe_env(DRY_RUN=dry, WORK="work", STAGES="1", OOD_CORPORA=corpus, LIBRISPEECH_URL="http://invalid.test")
    proc = subprocess.run(["bash", os.path.join(REPO, "recipes", "librispeech", "run.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and problem in proc.stderr, proc.stderr
    assert "+ " not in proc.stderr and list(tmp_path.iterdir()) == []  # nothing downloaded or prepared
