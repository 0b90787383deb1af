"""Speech recognition end to end through the real CLIs, on a synthetic corpus written as FLAC in
LibriSpeech's layout (:mod:`fairseq_pdd.data.toy_asr`):

preparation (``python -m fairseq_pdd.data.librispeech``) -> two tiny VGG-Transformer teachers
(``fairseq-train --task speech_to_text``) -> a PD-EnD2 student (``--task asr_distillation``) ->
decoding with WER (``fairseq-generate --scoring wer``; ``fairseq-pdd-generate`` with uncertainties,
in-domain and on an out-of-domain subset) -> ``fairseq-pdd-evaluate --task asr``.

Also: the prepared data against independent oracles (fairseq's own fbank path, numpy CMVN), resuming,
the model's safe config parsing, and bad inputs (sample rate, empty transcript, missing or unreadable
audio, feature dimension of data vs model vs teachers, teacher vocabulary).
"""
import argparse
import json
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest
import soundfile
import yaml
from cli_runner import ASR_EPOCHS, ASR_N_OOD, ASR_SIZES, asr_generate, asr_train, asr_wer, run

import fairseq_pdd
from fairseq_pdd.data import toy_asr as toy
from fairseq_pdd.data.librispeech import PreparationError, main as prepare_main, prepare

NBEST = 3
SUBSETS = {"test": ASR_SIZES["test"], "ood": ASR_N_OOD}


@dataclass
class ToyASR:
    """The shared corpus and teachers plus what this module trains and decodes on top of them."""
    root: str
    raw: str
    data: str
    prepare_stderr: str
    teachers: list
    untrained: str
    student: str = ""
    student_log: str = ""
    stdout: dict = field(default_factory=dict)  #: (system, subset) -> decoding stdout

    def jsonl(self, system, subset):
        return os.path.join(self.root, "decode", system, f"{subset}.jsonl")


@pytest.fixture(scope="module")
def asr(toy_asr):
    root = toy_asr.root
    data = toy_asr.data
    out = ToyASR(root, toy_asr.raw, data, toy_asr.prepare_stderr, toy_asr.teachers,
                 os.path.join(root, "untrained", "checkpoint_last.pt"))
    with ThreadPoolExecutor(max_workers=2) as pool:  # two subprocesses at a time
        untrained = pool.submit(asr_train, data, os.path.dirname(out.untrained), root,
                                ["--task", "speech_to_text", "--criterion", "cross_entropy", "--max-update", "1",
                                 "--lr", "1e-12"])
        student = asr_train(data, os.path.join(root, "student"), root,
                            ["--task", "asr_distillation", "--ensemble-paths", ":".join(out.teachers),
                             "--criterion", "rkl_dirichlet_proxy_distillation", "--max-epoch", ASR_EPOCHS, "--seed", "3"])
        out.student, out.student_log = os.path.join(root, "student", "checkpoint_last.pt"), student.stdout
        untrained.result()
        untrained = pool.submit(asr_generate, "fairseq-generate", data, out.untrained, "test", root)
        out.stdout[("untrained", "test")] = untrained.result().stdout
        jobs = {("plain_student", "test"): pool.submit(asr_generate, "fairseq-generate", data, out.student, "test", root)}
        for system, path in (("ensemble", ":".join(out.teachers)), ("student", out.student)):
            for subset in SUBSETS:
                extra = ["--nbest", str(NBEST), "--uncertainty-reference",
                         "--uncertainty-output", out.jsonl(system, subset)]
                jobs[(system, subset)] = pool.submit(asr_generate, "fairseq-pdd-generate", data, path, subset, root, extra)
        out.stdout.update({key: job.result().stdout for key, job in jobs.items()})
    return out


@pytest.fixture(scope="module")
def report(asr):
    out_dir = os.path.join(asr.root, "report")
    systems = [f"{s}={os.path.dirname(asr.jsonl(s, 'test'))}" for s in ("ensemble", "student")]
    proc = run("fairseq-pdd-evaluate", ["--system", systems[0], "--system", systems[1], "--in-domain", "test.jsonl",
                                        "--ood", "ood=ood.jsonl", "--task", "asr", "--nbest", "all",
                                        "--out-dir", out_dir], asr.root)
    with open(os.path.join(out_dir, "report.json")) as f:
        return json.load(f), proc.stdout


def read_tsv(path):
    with open(path) as f:
        header, *rows = [line.rstrip("\n").split("\t") for line in f]
    return [dict(zip(header, r)) for r in rows]


# ------------------------------------------------------------------------------------------ preparation


def test_prepared_data_layout(asr):
    """Manifests, features, vocabulary and config in fairseq's speech_to_text format; progress bars shown."""
    with open(os.path.join(asr.data, "config.yaml")) as f:
        config = yaml.safe_load(f)
    vocab = f"spm_unigram{toy.TOY_VOCAB_SIZE}"
    assert config == {
        "vocab_filename": f"{vocab}.txt",
        "bpe_tokenizer": {"bpe": "sentencepiece", "sentencepiece_model": f"{vocab}.model"},
        "input_channels": 1, "input_feat_per_channel": 80, "audio_root": os.path.abspath(asr.data),
        "feature_transforms": {"*": ["utterance_cmvn"]},
    }
    with open(os.path.join(asr.data, f"{vocab}.txt")) as f:
        pieces = [line.split()[0] for line in f]
    assert len(pieces) == toy.TOY_VOCAB_SIZE - 4 and "▁seven" in pieces  # fairseq adds <s> <pad> </s> <unk>
    for subset, n in {**ASR_SIZES, "ood": ASR_N_OOD}.items():
        rows = read_tsv(os.path.join(asr.data, f"{subset}.tsv"))
        assert len(rows) == n and list(rows[0]) == ["id", "audio", "n_frames", "tgt_text", "speaker"]
        assert len({r["id"] for r in rows}) == n
        assert f"fbank {subset}: 100%" in asr.prepare_stderr and f"{n}/{n}" in asr.prepare_stderr
    row = read_tsv(os.path.join(asr.data, "train.tsv"))[0]
    speaker, chapter, _ = row["id"].split("-")
    flac = os.path.join(asr.raw, "train", speaker, chapter, row["id"] + ".flac")
    with open(os.path.join(asr.raw, "train", speaker, chapter, f"{speaker}-{chapter}.trans.txt")) as f:
        transcript = dict(line.strip().split(" ", 1) for line in f)[row["id"]]
    assert row["tgt_text"] == transcript.lower() and row["speaker"] == speaker
    features = np.load(os.path.join(asr.data, row["audio"]))
    samples, rate = soundfile.read(flac, dtype="float32")
    assert rate == 16000 and features.dtype == np.float32
    assert features.shape == (1 + (samples.size - 400) // 160, 80) == (int(row["n_frames"]), 80)  # 25/10 ms frames
    from fairseq.data.audio.audio_utils import _get_torchaudio_fbank  # fairseq's own fbank path

    expected = _get_torchaudio_fbank(samples[None, :] * 2 ** 15, 16000, 80)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-4)


def _speech_task(data, config="config.yaml", task="speech_to_text"):
    from fairseq.tasks import TASK_REGISTRY

    fairseq_pdd.register()  # the in-process way to get the plugin's tasks

    args = argparse.Namespace(data=data, config_yaml=config, multitask_config_yaml=None, max_source_positions=6000,
                              max_target_positions=1024, seed=1, ensemble_paths="", fp16_ensemble=False,
                              bf16_ensemble=False)
    return TASK_REGISTRY[task].setup_task(args)


def test_fairseq_reads_features_with_utterance_cmvn(asr):
    """fairseq's speech_to_text dataset gives the stored features, normalised per utterance (numpy oracle)."""
    task = _speech_task(asr.data)
    task.load_dataset("dev")
    item = task.datasets["dev"][0]
    x = np.load(os.path.join(asr.data, read_tsv(os.path.join(asr.data, "dev.tsv"))[0]["audio"])).astype(np.float64)
    # fairseq computes the variance as E[x^2] - mean^2 in float32: agreement to ~1e-3
    np.testing.assert_allclose(item.source.numpy(), (x - x.mean(0)) / x.std(0), rtol=1e-3, atol=1e-2)


def test_global_cmvn_and_resume(tmp_path, caplog):
    """--cmvn global: statistics of the training features (numpy oracle) in config.yaml; a second run
    featurises nothing again, and a deleted or truncated feature file is recomputed."""
    raw = str(tmp_path / "raw")
    toy.write_subset(raw, "train", 12, seed=5)
    out = str(tmp_path / "data")
    prepare(raw, ["train"], out, vocab_size=20, cmvn="global")
    with open(os.path.join(out, "config.yaml")) as f:
        config = yaml.safe_load(f)
    assert config["feature_transforms"] == {"*": ["global_cmvn"]}
    stats = np.load(config["global_cmvn"]["stats_npz_path"])
    frames = np.concatenate([np.load(os.path.join(out, r["audio"])) for r in read_tsv(os.path.join(out, "train.tsv"))])
    np.testing.assert_allclose(stats["mean"], frames.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats["std"], frames.std(0), rtol=1e-4, atol=1e-4)

    folder = os.path.join(out, "fbank80", "train")
    files = sorted(os.listdir(folder))
    before = {f: (os.stat(os.path.join(folder, f)).st_mtime_ns, np.load(os.path.join(folder, f))) for f in files}
    os.remove(os.path.join(folder, files[0]))
    with open(os.path.join(folder, files[1]), "r+b") as f:
        f.truncate(100)
    with caplog.at_level("INFO", logger="fairseq_pdd.data.librispeech"):
        prepare(raw, ["train"], out, vocab_size=20, cmvn="global")
    assert "train: 12 utterances, 2 featurised now, 10 already done" in caplog.text
    for name, (mtime, array) in before.items():
        path = os.path.join(folder, name)
        np.testing.assert_array_equal(np.load(path), array)
        assert (os.stat(path).st_mtime_ns == mtime) == (name not in files[:2]), name
    assert not [f for f in os.listdir(folder) if ".tmp" in f]


# ------------------------------------------------------------------------------------- training, decoding


def test_student_distils_the_teachers(asr):
    """asr_distillation loaded both teachers and fed the criterion the ensemble's streamed statistics."""
    log = asr.student_log
    assert f"loaded 2 teachers (torch.float32): {asr.teachers[0]}, {asr.teachers[1]}" in log
    valid = [float(x) for x in re.findall(r"valid on 'dev' subset \| loss ([\d.]+)", log)]
    assert len(valid) == int(ASR_EPOCHS) and valid[-1] < valid[0]
    mkl = re.findall(r"valid on 'dev' subset .*\| ensemble_mkl ([\d.]+)", log)
    assert mkl and float(mkl[-1]) > 0


def test_wer_of_student_and_ensemble_beats_untrained(asr):
    untrained = asr_wer(asr.stdout[("untrained", "test")])
    student_plain = asr_wer(asr.stdout[("plain_student", "test")])  # fairseq-generate (softmax of the logits)
    student = asr_wer(asr.stdout[("student", "test")])  # fairseq-pdd-generate (Dirichlet mean)
    ensemble = asr_wer(asr.stdout[("ensemble", "test")])
    print(f"WER untrained {untrained}, ensemble {ensemble}, student {student} (plain decoding {student_plain})")
    assert untrained > 150  # an untrained decoder rambles on (about 270 % here)
    assert ensemble < 75  # about 55 % here after 8 epochs
    assert max(student, student_plain) < 95  # about 85 % here after 8 epochs from scratch


def test_uncertainty_records(asr):
    """One JSONL record per (utterance, rank), ranks -1..NBEST-1, in both decodings; no source text for speech."""
    for system in ("ensemble", "student"):
        for subset, n in SUBSETS.items():
            with open(asr.jsonl(system, subset)) as f:
                records = [json.loads(line) for line in f]
            assert {(r["id"], r["rank"]) for r in records} == {(i, k) for i in range(n) for k in range(-1, NBEST)}
            assert all(r["source"] == "" and r["model"] == ("ensemble" if system == "ensemble" else "dirichlet")
                       for r in records)
            assert all(len(r["tokens"]) == r["length"] - 1 for r in records)


def test_evaluation_report(asr, report):
    """WER, PRR against sentence WER, token error detection and OOD detection for both systems."""
    rep, stdout = report
    assert rep["config"]["task"] == "asr" and rep["config"]["prr_error"] == "wer"
    for name in ("ensemble", "student"):
        res = rep["systems"][name]
        assert res["quality"]["wer"] == pytest.approx(asr_wer(asr.stdout[(name, "test")]), abs=0.01)  # fairseq's scorer
        assert set(res["quality"]) == {"wer", "sentence_wer_mean", "nll"}
        assert "mutual_information" in res["error_detection"] and all(
            -1 <= v <= 1 for v in res["error_detection"].values())
        assert set(res["token_error_detection"]) == {"reference", "hypothesis"}
        assert 0 < res["token_error_detection"]["hypothesis"]["error_rate"] < 1
        ood = res["ood"]["ood"]["mutual_information"]
        assert 0 <= ood["roc_auc"] <= 1
        assert res["ood_quality"]["ood"]["wer"] > res["quality"]["wer"]  # unknown words are not recognised
    assert "WER (%)" in stdout and "Token error detection PR-AUC (%), hypothesis" in stdout


# ----------------------------------------------------------------------------------------------- model


def test_examples_loaded_privately():
    """fairseq's VGG-Transformer module is reused without registering fairseq's own names or leaving
    a top-level ``examples`` package behind."""
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY

    from fairseq_pdd.models import vggtransformer

    assert vggtransformer.fairseq_vgg.__file__.endswith("examples/speech_recognition/models/vggtransformer.py")
    assert MODEL_REGISTRY["pdd_vggtransformer"] is vggtransformer.VGGTransformerModel
    assert {"pdd_vggtransformer_2", "pdd_vggtransformer_tiny"} <= set(ARCH_MODEL_REGISTRY)
    assert "asr_vggtransformer" not in MODEL_REGISTRY and "vggtransformer_2" not in ARCH_MODEL_REGISTRY
    assert "examples" not in sys.modules


def test_layer_configs_are_literals_not_code():
    from fairseq_pdd.models.vggtransformer import parse_layer_config

    assert parse_layer_config("((64, 4, 128, True, 0.1, 0.1, 0.1),) * 2", "x") == ((64, 4, 128, True, 0.1, 0.1, 0.1),) * 2
    assert parse_layer_config("[(8, 3, 2, 1, True)]", "x") == [(8, 3, 2, 1, True)]
    with pytest.raises(ValueError, match=r"--vggblock-enc-config: unsupported expression \"__import__\('os'\)"):
        parse_layer_config("__import__('os').getcwd()", "vggblock_enc_config")


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def small_corpus(tmp_path):
    raw = str(tmp_path / "raw")
    ids = toy.write_subset(raw, "train", 4, seed=7)
    speaker, chapter, _ = ids[1].split("-")
    return raw, os.path.join(raw, "train", speaker, chapter), ids[1]


def _break_sample_rate(folder, uid):
    soundfile.write(os.path.join(folder, uid + ".flac"), np.zeros(8000, dtype=np.float32), 8000)
    return f"audio of utterance {uid} ({folder}/{uid}.flac) has a sample rate of 8000 Hz, expected 16000 Hz (--sample-rate)"


def _empty_transcript(folder, uid):
    path = os.path.join(folder, "-".join(uid.split("-")[:2]) + ".trans.txt")
    with open(path) as f:
        lines = [uid if line.startswith(uid) else line.rstrip("\n") for line in f]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return f"{path}, line {lines.index(uid) + 1}: empty transcript for utterance {uid}"


def _missing_audio(folder, uid):
    os.remove(os.path.join(folder, uid + ".flac"))
    return f"audio of utterance {uid} not found: {folder}/{uid}.flac"


def _unreadable_audio(folder, uid):
    with open(os.path.join(folder, uid + ".flac"), "wb") as f:
        f.write(b"fLaC this is not audio")
    return f"cannot read audio of utterance {uid} ({folder}/{uid}.flac)"


@pytest.mark.parametrize("breaker", [_break_sample_rate, _empty_transcript, _missing_audio, _unreadable_audio])
def test_bad_corpus(small_corpus, tmp_path, breaker, capsys):
    raw, folder, uid = small_corpus
    message = breaker(folder, uid)
    with pytest.raises(PreparationError) as e:
        prepare(raw, ["train"], str(tmp_path / "out"), vocab_size=12)
    assert message in str(e.value)
    capsys.readouterr()
    assert prepare_main(["--root", raw, "--subsets", "train", "--out-dir", str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("fairseq-pdd-prepare-librispeech: error: ") and message in err, err


def test_missing_subset(small_corpus, tmp_path):
    with pytest.raises(PreparationError, match=r"subset 'dev-clean' not found: .*/raw/dev-clean is not a directory"):
        prepare(small_corpus[0], ["dev-clean"], str(tmp_path / "out"))


@pytest.fixture(scope="module")
def data40(asr, tmp_path_factory):
    """The toy's dev and test subsets as 40-dim features, with the toy's vocabulary."""
    out = str(tmp_path_factory.mktemp("data40"))
    vocab = f"spm_unigram{toy.TOY_VOCAB_SIZE}"
    for ext in (".model", ".txt"):
        shutil.copy(os.path.join(asr.data, vocab + ext), out)
    prepare(asr.raw, ["dev", "test"], out, vocab_size=toy.TOY_VOCAB_SIZE, num_mel_bins=40)
    return out


def test_teachers_trained_on_other_features_or_vocabulary(asr, data40, tmp_path):
    from fairseq_pdd.teachers.ensemble import TeacherEnsemble, TeacherError

    with pytest.raises(TeacherError, match=re.escape(
            f"teacher {asr.teachers[0]} was trained on 80-dim speech features but the task's data has 40-dim ones")):
        TeacherEnsemble.load(asr.teachers, _speech_task(data40, task="asr_distillation"))
    other = str(tmp_path / "other_vocab")
    shutil.copytree(data40, other)
    dictionary = os.path.join(other, f"spm_unigram{toy.TOY_VOCAB_SIZE}.txt")
    with open(dictionary) as f:
        lines = f.readlines()
    with open(dictionary, "w") as f:
        f.writelines(lines[1:2] + lines[:1] + lines[2:])
    with pytest.raises(TeacherError, match=re.escape(
            f"teacher {asr.teachers[0]} was trained with a different target dictionary ({toy.TOY_VOCAB_SIZE} symbols "
            f"vs the data's {toy.TOY_VOCAB_SIZE}; first difference at index 4). Prepare the student's data")):
        TeacherEnsemble.load(asr.teachers, _speech_task(other, task="asr_distillation"))


def test_decoding_with_other_feature_dimension(asr, data40):
    """The 80-dim student on 40-dim data; and 40-dim features whose config.yaml claims 80 dims."""
    with open(os.path.join(data40, "config.yaml")) as f:
        config = yaml.safe_load(f)
    config["input_feat_per_channel"] = 80
    with open(os.path.join(data40, "config80.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    cases = {
        "config.yaml": "FeatureDimensionError: the checkpoint was trained on 80-dim speech features but the data "
                       "has 40-dim ones (input_feat_per_channel in its config.yaml)",
        "config80.yaml": "FeatureDimensionError: speech features of shape (",
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = {c: pool.submit(asr_generate, "fairseq-generate", data40, asr.student, "dev", asr.root,
                                ["--config-yaml", c], True) for c in cases}
    for config_name, message in cases.items():
        stderr = procs[config_name].result().stderr
        assert message in stderr, stderr[-3000:]
    assert "do not fit the model, which expects 80-dim frames" in procs["config80.yaml"].result().stderr
