"""The WMT17 En-De recipe (recipes/wmt17_en_de/) run for real on a tiny corpus on CPU, and its dry run.

The synthetic corpus of ``fairseq_pdd.data.toy_mt`` is written in the recipe's RAW_DIR layout (the WMT
file names), so every stage script runs as on the real data: sentencepiece, fairseq-preprocess,
two teachers, the ensemble's translations of train as the distillation set, a PD-EnD2 student,
fairseq-pdd-generate and fairseq-pdd-evaluate. Only the sizes (model, vocabulary, updates) shrink.
"""
import json
import os
import re
import subprocess
import tarfile

import pytest

from cli_runner import REPO, dry_run_recipe, recipe_env, rerun_commands, run_recipe
from fairseq_pdd.data import mt_text
from fairseq_pdd.cli import user_dir
from fairseq_pdd.data.toy_mt import TINY_TRANSFORMER, write_corpus

RECIPE = os.path.join(REPO, "recipes", "wmt17_en_de")
CORPORA = ["europarl-v7.de-en", "commoncrawl.de-en", "news-commentary-v12.de-en"]
CRITERION = "rkl_dirichlet_proxy_distillation"


def write_wmt_layout(raw_dir: str, toy_dir: str) -> None:
    """The toy corpus under the WMT17 file names: train split over the three corpora, valid as
    newstest2013, test as newstest2014. News Commentary is left in its (already "downloaded")
    archive, training/news-commentary-v12.de-en.* in downloads/training-parallel-nc-v12.tgz, so the
    recipe's extraction runs too."""
    write_corpus(toy_dir, {"train": 270, "valid": 37, "test": 43}, src="en", tgt="de", seed=1)
    os.makedirs(os.path.join(raw_dir, "downloads"))
    archived = os.path.join(toy_dir, "training")
    os.makedirs(archived)
    for lang in ("en", "de"):
        lines = list(mt_text.iter_lines(os.path.join(toy_dir, f"train.{lang}")))
        for i, name in enumerate(CORPORA):
            folder = archived if name.startswith("news-commentary") else raw_dir
            with open(os.path.join(folder, f"{name}.{lang}"), "w") as f:
                f.writelines(line + "\n" for line in lines[i::len(CORPORA)])
        for split, name in (("valid", "newstest2013"), ("test", "newstest2014")):
            os.link(os.path.join(toy_dir, f"{split}.{lang}"), os.path.join(raw_dir, f"{name}.{lang}"))
    with tarfile.open(os.path.join(raw_dir, "downloads", "training-parallel-nc-v12.tgz"), "w:gz") as tar:
        tar.add(archived, arcname="training")


def run_the_recipe(root):
    """The recipe run on the toy corpus in ``root``: (root, WORK, its environment, its output)."""
    write_wmt_layout(str(root / "raw"), str(root / "toy"))
    env = recipe_env(
        WORK=str(root / "work"), RAW_DIR=str(root / "raw"), DEVICE="cpu", M="2", SEEDS="1 2",
        BPE_SIZE="120", SPM_EXTRA="--no-hard-vocab-limit", OOD_SETS="perm", THREADS="1",
        EVAL_PLOTS="0", EVAL_ENS_PRED="0",  # plots and test_ens_pred: ~10 s of CPU; the dry run shows them
        MODEL_ARGS=" ".join(TINY_TRANSFORMER), LR="5e-3", WARMUP="20",
        TEACHER_MAX_TOKENS="600", TEACHER_TOKENS_PER_UPDATE="600", TEACHER_MAX_UPDATE="30",  # update freq 1
        MAX_TOKENS="600", UPDATE_FREQ="1", MAX_UPDATE="10",
        EXTRA="--num-workers 0 --no-progress-bar --log-interval 20 --no-epoch-checkpoints",
        CRITERIA=CRITERION, GEN_MAX_TOKENS="4000", MAX_LEN_B="4",
    )
    log = run_recipe("wmt17_en_de", str(root), env)
    return root, root / "work", env, log


BACKGROUND = {"recipe": run_the_recipe}  #: the run starts with the session (conftest.Background)


@pytest.fixture(scope="module")
def recipe(background):
    return background.result(run_the_recipe)


def binarised(data_dir, split, lang):
    """The sentences of a binarised split as strings of dictionary symbols (no EOS)."""
    from fairseq.data import Dictionary, data_utils

    vocab = Dictionary.load(os.path.join(data_dir, f"dict.{lang}.txt"))
    dataset = data_utils.load_indexed_dataset(os.path.join(data_dir, f"{split}.en-de.{lang}"), vocab)
    assert dataset is not None, (data_dir, split, lang)
    return [vocab.string(dataset[i][:-1]) for i in range(len(dataset))]


def hypotheses_by_id(*paths):
    """``{id: text}`` of the H- lines of fairseq-generate outputs, parsed independently of mt_text."""
    out = {}
    for path in paths:
        for line in open(path, encoding="utf-8"):
            if line.startswith("H-"):
                fields = line.rstrip("\n").split("\t")
                out[int(fields[0][2:])] = fields[2] if len(fields) > 2 else ""
    return out


def test_prepare_binarises_with_one_joined_dictionary(recipe):
    root, work, _, log = recipe
    data = work / "data-bin"
    assert (work / "spm" / "spm.model").exists()
    assert (data / "dict.en.txt").read_text() == (data / "dict.de.txt").read_text()
    train_src = (work / "text" / "clean" / "train.en").read_text().splitlines()
    assert 200 < len(train_src) <= 270 and all("\u2581" in line for line in train_src)  # sentencepiece pieces
    assert binarised(str(data), "train", "en") == train_src
    assert len(binarised(str(data), "test", "de")) == len(binarised(str(data), "perm", "de")) == 43
    # perm: the same source pieces per sentence, shuffled words; references unchanged
    test_src, perm_src = binarised(str(data), "test", "en"), binarised(str(data), "perm", "en")
    assert test_src != perm_src and [sorted(s.split()) for s in test_src] == [sorted(s.split()) for s in perm_src]
    assert binarised(str(data), "test", "de") == binarised(str(data), "perm", "de")
    assert "fairseq-preprocess" in log and "--joined-dictionary" in log
    assert "curl" not in log and "tar -xzOf" in log  # the archive found in RAW_DIR/downloads, extracted
    nc = (root / "raw" / "news-commentary-v12.de-en.de").read_text()
    assert nc == (root / "toy" / "training" / "news-commentary-v12.de-en.de").read_text() != ""


def test_distillation_targets_are_the_ensembles_hypotheses(recipe):
    _, work, _, _ = recipe
    data, distill, gen = work / "data-bin", work / "data-bin-distill", work / "distill" / "generate"
    train_hyps = hypotheses_by_id(*sorted(gen.glob("train.*-of-*.txt")))
    assert binarised(str(distill), "train", "en") == binarised(str(data), "train", "en")
    targets = binarised(str(distill), "train", "de")
    assert len(targets) == len(train_hyps) and targets == [train_hyps[i] for i in range(len(targets))]
    assert targets != binarised(str(data), "train", "de")  # not the references
    for split in ("valid", "test"):
        hyps = hypotheses_by_id(gen / f"{split}.txt")
        ens_pred = binarised(str(distill), f"{split}_ens_pred", "de")
        assert ens_pred == [hyps[i] for i in range(len(ens_pred))]
        assert binarised(str(distill), split, "de") == binarised(str(data), split, "de")  # linked references
    assert (distill / "dict.de.txt").read_text() == (data / "dict.de.txt").read_text()


def test_teachers_and_student_trained_by_the_recipe(recipe):
    _, work, _, log = recipe
    for i in (1, 2):
        assert (work / "teachers" / f"teacher{i}" / "checkpoint_last.pt").exists()
        assert "label_smoothed_cross_entropy" in log
    student = work / "students" / CRITERION
    assert (student / "checkpoint_last.pt").exists() and (student / "done").exists()
    train_log = (student / "train.log").read_text()
    assert "ensemble_precision" in train_log and "valid_ens_pred" in train_log


def test_report_has_bleu_and_ood_detection(recipe):
    _, work, _, _ = recipe
    report = json.loads((work / "eval" / "test" / "report.json").read_text())
    assert set(report["systems"]) == {"ensemble", CRITERION}
    for system in report["systems"].values():
        assert 0.0 <= system["quality"]["bleu"] <= 100.0 and "13a" in system["quality"]["bleu_signature"]
        assert system["n_samples"] == 43  # no batch dropped (--required-batch-size-multiple 1)
        auc = system["ood"]["perm"]["mutual_information"]["roc_auc"]
        assert auc is None or 0.0 <= auc <= 1.0
    decoded = [json.loads(line) for line in open(work / "decode" / "ensemble" / "uncertainty-test.jsonl")]
    assert all("\u2581" not in r["hypothesis"] for r in decoded)  # sentencepiece removed before BLEU
    assert not (work / "eval" / "test_ens_pred").exists()  # EVAL_ENS_PRED=0 (the dry run shows it)


def test_rerun_skips_every_finished_step(recipe):
    root, _, env, _ = recipe
    commands = rerun_commands("wmt17_en_de", str(root), env)
    assert commands == [], commands


def test_dry_run_prints_the_paper_commands_and_creates_nothing(tmp_path):
    text = dry_run_recipe("wmt17_en_de", tmp_path, OOD_OTHER_SOURCES="fr=newstest2014.fr")
    lines = text.splitlines()
    trains = [line for line in lines if line.startswith("+ fairseq-train")]
    assert len(trains) == 3 + 2  # M teachers, PD-EnD2 and KD students
    paper = ["--arch transformer_wmt_en_de_big", "--share-decoder-input-output-embed", "--optimizer adam",
             r"--adam-betas \(0.9\,\ 0.98\)", "--lr 5e-4", "--lr-scheduler inverse_sqrt", "--warmup-updates 4000",
             "--weight-decay 1e-4", f"--user-dir {user_dir()}", "--fp16"]
    students = [t for t in trains if "--task distillation" in t]
    assert len(students) == 2
    for t in trains:
        assert all(option in t for option in paper), t
    for t in students:
        for option in ("--dropout 0.2", "--clip-norm 10.0", "--max-tokens 8192", "--update-freq 4",
                       "--max-update 20000", "--seed 0", "--fp16-ensemble", "--ensemble-paths work/teachers/"
                       "teacher1/checkpoint_best.pt:work/teachers/teacher2/checkpoint_best.pt:work/teachers/"
                       "teacher3/checkpoint_best.pt", "--valid-subset valid\\,test\\,valid_ens_pred"):
            assert option in t, (option, t)
    assert "--criterion rkl_dirichlet_proxy_distillation --target-concentration mkl --model-offset 0 " \
           "--target-offset 1" in students[0]
    assert "--criterion label_smoothed_cross_entropy --label-smoothing 0.1" in trains[0]
    for t in trains[:3]:  # teachers: the same 8192 x 4 = 32768 tokens per GPU and update
        assert "--max-tokens 8192 --update-freq 4 --max-update 300000" in t, t
    assert text.count("x 1 workers = 32768 tokens per update") == 2  # teachers' and students' stage lines
    assert "sacrebleu -t wmt14/full -l en-de --echo src" in text and "training-parallel-nc-v12.tgz" in text
    assert "--vocab-size 40000" in text and "--joined-dictionary" in text
    assert "--gen-subset train --path" in text and "--beam 5 --nbest 1" in text
    decodes = [line for line in lines if "fairseq-generate" in line or "fairseq-pdd-generate" in line]
    assert len(decodes) == 3 + 4 * 3 + 2  # train/valid/test; test/perm/dede/fr x 3 systems; test_ens_pred x 2
    assert "swap --other-source newstest2014.fr --target work/text/raw/test.de --truncate" in text
    assert "--testpref work/text/spm/test\\,work/text/spm/perm\\,work/text/spm/dede\\,work/text/spm/fr" in text
    assert "--ood perm=uncertainty-perm.jsonl --ood dede=uncertainty-dede.jsonl --ood fr=uncertainty-fr.jsonl" in text
    assert all("--required-batch-size-multiple 1" in d and "--distributed-world-size" in d for d in decodes)
    assert all("--max-len-a 1.2 --max-len-b 10" in d for d in decodes)  # no 200-token repetition loops
    assert "fairseq-pdd-generate" in text and "--bpe sentencepiece" in text and "--scoring sacrebleu" in text
    assert "--gen-subset perm" in text and "--gen-subset dede" in text and "fairseq-pdd-evaluate" in text
    assert "--in-domain uncertainty-test_ens_pred.jsonl" in text


def batch_options(text):
    """(teachers', students') (--max-tokens, --update-freq) of a dry run's fairseq-train lines."""
    found = {}
    for line in text.splitlines():
        if line.startswith("+ fairseq-train"):
            kind = "students" if "--task distillation" in line else "teachers"
            max_tokens, update_freq = re.search(r"--max-tokens (\d+) --update-freq (\d+)", line).groups()
            found.setdefault(kind, set()).add((int(max_tokens), int(update_freq)))
    return found["teachers"], found["students"]


@pytest.mark.parametrize("settings, teachers, students, per_update", [
    ({}, (8192, 4), (8192, 4), 32768),  # the paper's 1024 x 32 tokens per GPU and update
    ({"MAX_TOKENS": "2048", "TEACHER_MAX_TOKENS": "4096"}, (4096, 8), (2048, 16), 32768),  # product kept
    ({"MAX_TOKENS": "1024", "UPDATE_FREQ": "32"}, (8192, 4), (1024, 32), 32768),  # the authors' own batches
    ({"UPDATE_FREQ": "2"}, (8192, 4), (8192, 2), 16384),  # an explicit update freq wins
    ({"NGPU": "8", "TOKENS_PER_UPDATE": "4096", "MAX_TOKENS": "4096"}, (8192, 4), (4096, 1), 32768),  # 8 GPUs
])
def test_dry_run_batches_keep_the_tokens_per_update(tmp_path, settings, teachers, students, per_update):
    text = dry_run_recipe("wmt17_en_de", tmp_path, STAGES="2 4", **settings)
    assert batch_options(text) == ({teachers}, {students})
    world = int(settings.get("NGPU", 1))
    assert f"{students[0]} x {students[1]} per GPU x {world} workers = {per_update} tokens per update" in text
    assert students[0] * students[1] * world == per_update


@pytest.mark.parametrize("settings, problem", [
    ({"MAX_TOKENS": "3000"}, "MAX_TOKENS=3000 does not divide TOKENS_PER_UPDATE=32768"),
    ({"TEACHER_MAX_TOKENS": "65536"}, "TEACHER_MAX_TOKENS=65536 does not divide TEACHER_TOKENS_PER_UPDATE=32768"),
    ({"UPDATE_FREQ": "0"}, "UPDATE_FREQ='0' is not a positive whole number"),
    ({"TOKENS_PER_UPDATE": "32k"}, "TOKENS_PER_UPDATE='32k' is not a positive whole number"),
])
def test_dry_run_refuses_batches_that_do_not_divide(tmp_path, settings, problem):
    env = recipe_env(DRY_RUN="1", WORK="work", STAGES="4", **settings)
    proc = subprocess.run(["bash", os.path.join(RECIPE, "run.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and problem in proc.stderr, proc.stderr[-2000:]
    assert "fairseq-train" not in proc.stderr


@pytest.mark.parametrize("ids, problem", [([0, 2], r"no hypothesis for 1 \(1\)"), ([0, 1, 2, 3], "beyond")])
def test_extract_names_missing_and_extra_ids(tmp_path, ids, problem):
    (tmp_path / "src").write_text("a\nb\nc\n")
    (tmp_path / "gen").write_text("".join(f"S-{i}\tx\nH-{i}\t-0.5\th{i}\n" for i in ids))
    with pytest.raises(ValueError, match=problem):
        mt_text.extract_pairs([str(tmp_path / "gen")], str(tmp_path / "src"), str(tmp_path / "o.en"),
                              str(tmp_path / "o.de"))
    assert not (tmp_path / "o.de").exists()


def test_extract_orders_by_id_across_shards(tmp_path):
    (tmp_path / "src").write_text("a\nb\nc\n")
    (tmp_path / "g0").write_text("H-2\t-1\tz z\nD-2\t-1\tz z\nH-0\t-1\tx\n")
    (tmp_path / "g1").write_text("H-1\t-1\t\n")  # an empty hypothesis stays a line
    assert mt_text.extract_pairs([str(tmp_path / "g0"), str(tmp_path / "g1")], str(tmp_path / "src"),
                                 str(tmp_path / "o.en"), str(tmp_path / "o.de")) == 3
    assert (tmp_path / "o.en").read_text() == "a\nb\nc\n" and (tmp_path / "o.de").read_text() == "x\n\nz z\n"
    (tmp_path / "g2").write_text("H-1\t-1\ty\n")
    with pytest.raises(ValueError, match="second hypothesis for sample 1"):
        mt_text.read_hypotheses([str(tmp_path / "g1"), str(tmp_path / "g2")])


def test_clean_follows_the_moses_length_and_ratio_rule(tmp_path):
    (tmp_path / "s").write_text("a b\n\na b c d\na\na b c\n")
    (tmp_path / "t").write_text("x y\nx\nx y\nx\nx y\n")
    kept = mt_text.clean_parallel(str(tmp_path / "s"), str(tmp_path / "t"), str(tmp_path / "cs"),
                                  str(tmp_path / "ct"), min_len=1, max_len=3, ratio=1.5)
    assert kept == (3, 5)  # empty source, 4 > max_len dropped; 3/2 = 1.5 kept
    assert (tmp_path / "cs").read_text() == "a b\na\na b c\n"
    (tmp_path / "t").write_text("x\n")
    with pytest.raises(ValueError, match="differ in length"):
        mt_text.clean_parallel(str(tmp_path / "s"), str(tmp_path / "t"), str(tmp_path / "cs"), str(tmp_path / "ct"))


def test_dry_run_of_the_other_criteria(tmp_path):
    """EnD2 and the forward KL to the proxy start from the KD student, or (ANNEAL_CRITERIA) train with the
    temperature annealed, with only their own options (MAX_TARGET_PRECISION, DIVIDE_BY_PRECISION,
    TEACHER_SMOOTHING when set); a misspelt criterion stops stage 4."""
    env = recipe_env(DRY_RUN="1", WORK="work", STAGES="4", CRITERIA="forward_kl_mean_distillation "
                     "sequence_distribution_distillation dirichlet_proxy_distillation rkl_dirichlet_proxy_distillation")

    def trains():
        proc = subprocess.run(["bash", os.path.join(RECIPE, "run.sh")], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return [line for line in proc.stderr.splitlines() if line.startswith("+ fairseq-train")]

    kd, end2, fkl, pd = trains()
    warm = "--finetune-from-model work/students/forward_kl_mean_distillation/checkpoint_best.pt "
    assert "--criterion forward_kl_mean_distillation --max-tokens" in kd
    assert f"--criterion sequence_distribution_distillation --model-offset 1 {warm}" in end2
    assert f"--criterion dirichlet_proxy_distillation --target-concentration mkl --model-offset 1 --target-offset 1 " \
           f"{warm}" in fkl
    assert "--target-concentration" not in end2
    assert all("--init-temp" not in line for line in (kd, end2, fkl, pd))
    assert all("--finetune-from-model" not in line for line in (kd, pd))
    env.update(FINETUNE_FROM_KD="dirichlet_proxy_distillation", ANNEAL_CRITERIA="sequence_distribution_distillation "
               "dirichlet_proxy_distillation", INIT_TEMP="4", ANNEAL_END="1000")
    kd, end2, fkl, pd = trains()
    anneal = "--init-temp 4 --anneal-start 0 --anneal-end 1000 --temper-student "
    assert f"--criterion sequence_distribution_distillation --model-offset 1 {anneal}--max-tokens" in end2
    assert f"--target-offset 1 {anneal}{warm}" in fkl  # both: annealed from the KD student
    assert all(o not in line for o in ("--max-target-precision", "--divide-by-precision", "--teacher-smoothing")
               for line in (kd, end2, fkl, pd))  # off by default
    env.update(MAX_TARGET_PRECISION="50", DIVIDE_BY_PRECISION="1", TEACHER_SMOOTHING="1e-3", FINETUNE_FROM_KD="")
    kd, end2, fkl, pd = trains()
    assert f"--model-offset 1 --divide-by-precision --teacher-smoothing 1e-3 {anneal}--max-tokens" in end2
    assert f"--target-offset 1 --max-target-precision 50 {anneal}--max-tokens" in fkl
    assert all(o not in line for o in ("--max-target-precision", "--divide-by-precision", "--teacher-smoothing")
               for line in (kd, pd))  # EnD2's and the forward KL's options only
    env["CRITERIA"] = "rkl_dirichlet_proxy_distilation"
    proc = subprocess.run(["bash", os.path.join(RECIPE, "run.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "unknown criterion 'rkl_dirichlet_proxy_distilation'" in proc.stderr
    assert "fairseq-train" not in proc.stderr and list(tmp_path.iterdir()) == []


def test_run_to_writes_only_finished_output(tmp_path):
    """lib.sh's run_to: a failing command leaves neither FILE nor FILE.tmp; a finished one leaves FILE."""
    script = ('source "$0"; run_to "$1/ok.txt" printf "a\\nb\\n"; '
              'if run_to "$1/bad.txt" sh -c "echo partial; exit 3"; then exit 1; else echo "status $?"; fi')
    proc = subprocess.run(["bash", "-c", script, os.path.join(REPO, "recipes", "lib.sh"), str(tmp_path)],
                          env=recipe_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout == "status 3\n", proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.txt"]
    assert (tmp_path / "ok.txt").read_text() == "a\nb\n"
    assert f"+ sh -c echo\\ partial\\;\\ exit\\ 3 > {tmp_path}/bad.txt" in proc.stderr  # printed, shell-quoted
