"""B-DISTIL-style progressive ensembles for speech, through fairseq's CLI.

Two rounds of small VGG-Transformer members (``--arch bdistil_pdd_vggtransformer_tiny``) trained with
``--task asr_distillation`` against the ``toy_asr`` fixture's two teachers, then decoded with prefix
k = 1, 2 by ``fairseq-generate`` / ``fairseq-pdd-generate --task speech_to_text`` (WER).
"""
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from cli_runner import asr_generate, asr_train, asr_wer, dry_run_recipe

from fairseq_pdd.bdistil.cli import last_valid_metrics
from fairseq_pdd.cli import user_dir
from fairseq_pdd.models.bdistil_members import MemberError

EPOCHS = "3"
#: members half the teachers' width (pdd_vggtransformer_tiny is 64 wide), no dropout
SPEECH_MEMBER = [
    "--arch", "bdistil_pdd_vggtransformer_tiny",
    "--transformer-enc-config", "((32, 2, 64, True, 0.0, 0.0, 0.0),)", "--enc-output-dim", "32",
    "--tgt-embed-dim", "32", "--conv-dec-config", "((32, 3, True),)",
    "--transformer-dec-config", "((32, 2, 64, True, 0.0, 0.0, 0.0),)",
]


def train_round(toy_asr, name, seed, members=()):
    """One round on the speech corpus; returns (checkpoint, the last validation line's metrics)."""
    save = os.path.join(toy_asr.root, "bdistil", name)
    proc = asr_train(
        toy_asr.data, save, toy_asr.root,
        [*SPEECH_MEMBER, "--task", "asr_distillation", "--ensemble-paths", ":".join(toy_asr.teachers),
         "--criterion", "bdistil_residual_kd", "--max-epoch", EPOCHS, "--seed", str(seed),
         "--required-batch-size-multiple", "1",  # validation then scores every utterance in every round
         *(["--bdistil-members", ":".join(members)] if members else [])],
    )
    return os.path.join(save, "checkpoint_last.pt"), last_valid_metrics(proc.stdout + proc.stderr)


def prefix(k):
    return ["--model-overrides", f"{{'bdistil_prefix': {k}}}"]


@pytest.fixture(scope="module")
def speech_rounds(toy_asr):
    """Rounds 1 and 2, and the decodings (two subprocesses at a time): round 1's own checkpoint
    (while round 2 trains), round 2 with prefix 1 (fairseq-generate) and prefix 2 (fairseq-pdd-generate)."""
    data, root = toy_asr.data, toy_asr.root
    jsonl = os.path.join(root, "bdistil", "uncertainty-k2.jsonl")
    r1, m1 = train_round(toy_asr, "r1", seed=1)
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(asr_generate, "fairseq-generate", data, r1, "test", root)
        r2, m2 = train_round(toy_asr, "r2", seed=2, members=[r1])
        k1 = pool.submit(asr_generate, "fairseq-generate", data, r2, "test", root, prefix(1))
        k2 = pool.submit(asr_generate, "fairseq-pdd-generate", data, r2, "test", root,
                         [*prefix(2), "--uncertainty-output", jsonl])
        outputs = {"r1": first.result().stdout, 1: k1.result().stdout, 2: k2.result().stdout}
    return {"paths": [r1, r2], "metrics": [m1, m2], "stdout": outputs, "jsonl": jsonl}


def hypotheses(stdout, kind="H"):
    """``{id: text}`` of fairseq-generate's H- (hypothesis) or D- (detokenized hypothesis) lines."""
    return dict(re.findall(rf"^{kind}-(\d+)\t\S+\t(.*)$", stdout, re.M))


def test_speech_kl_to_the_teacher_does_not_rise_with_k(speech_rounds):
    m1, m2 = speech_rounds["metrics"]
    # round 2's frozen prefix is round 1's model, scored on the same dev batches
    assert m2["kl_prefix"] == pytest.approx(m1["kl_teacher"], abs=1e-3), (m1, m2)
    assert m2["kl_teacher"] < m2["kl_prefix"], m2
    assert m2["edge"] > 0, m2


def test_speech_decoding_with_every_prefix(speech_rounds, toy_asr):
    out = speech_rounds["stdout"]
    first, one, two = hypotheses(out["r1"]), hypotheses(out[1]), hypotheses(out[2])
    assert len(first) == len(two) == 40  # every test utterance
    assert one == first  # prefix 1 of round 2 decodes exactly as round 1's own checkpoint
    assert two != one
    wers = [asr_wer(out[k]) for k in ("r1", 1, 2)]
    assert wers[0] == wers[1] and 0 <= wers[2] <= 100, wers
    with open(speech_rounds["jsonl"]) as f:
        records = [json.loads(line) for line in f]
    assert sorted(r["id"] for r in records) == list(range(40))
    assert {str(r["id"]): r["hypothesis"] for r in records} == hypotheses(out[2], "D")


def test_speech_members_have_no_connection(speech_rounds, toy_asr):
    from fairseq import options, tasks

    args = options.parse_args_and_arch(
        options.get_training_parser(),
        [toy_asr.data, "--user-dir", user_dir(), "--task", "speech_to_text", *SPEECH_MEMBER,
         "--bdistil-members", speech_rounds["paths"][0], "--bdistil-connection", "last-hidden"],
    )
    task = tasks.setup_task(args)
    with pytest.raises(MemberError, match=r"member 1 .*TransformerDecoder\) has no extract_features"):
        task.build_model(args)


def test_recipe_speech_mode_dry_run(tmp_path):
    """``TASK=speech`` prepares the toy speech corpus, trains, distils and scores (WER) speech models, and
    decodes the boosted ensemble with early stopping too."""
    commands = dry_run_recipe("bdistil", str(tmp_path), TASK="speech")
    for expected in ("-m fairseq_pdd.data.toy_asr", "-m fairseq_pdd.data.librispeech", "--arch pdd_vggtransformer_tiny",
                     "--arch bdistil_pdd_vggtransformer_tiny", "--task asr_distillation", "--scoring wer",
                     "--task speech_to_text --gen-subset test", "fairseq-pdd-generate", "bdistil_early_stop_confidence"):
        assert expected in commands, expected
    assert "--arch bdistil_transformer" not in commands and "sacrebleu" not in commands
