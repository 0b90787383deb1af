"""B-DISTIL-style progressive ensembles through fairseq's CLI: training rounds, anytime decoding with
and without early stopping, bad input.

One session-scoped run on the toy corpus (the ``toy_mt`` fixture's two teachers as the ensemble
teacher), two subprocesses at a time: members 1, 2 boosted, member 3 boosted with a last-hidden
connection, and an independently trained member 2' for the averaging baseline. The per-prefix KL
values come from the validation lines of the rounds' own ``fairseq-train`` logs (members frozen,
exactly the accepted model) and from ``fairseq-validate``. Speech members: ``test_bdistil_speech.py``.
"""
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cli_runner import run, train

from fairseq_pdd.bdistil.cli import acceptance, last_valid_metrics, main as bdistil_cli
from fairseq_pdd.teachers.checkpoints import CheckpointError
from fairseq_pdd.cli import user_dir
from fairseq_pdd.models.bdistil_members import MemberError

EPOCHS = "4"


def member_options(dim: int):
    return [
        "--arch", "bdistil_transformer", "--encoder-layers", "1", "--decoder-layers", "1",
        "--encoder-embed-dim", str(dim), "--decoder-embed-dim", str(dim),
        "--encoder-ffn-embed-dim", str(2 * dim), "--decoder-ffn-embed-dim", str(2 * dim),
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
        "--share-decoder-input-output-embed", "--dropout", "0.0",
    ]


def train_member(toy_mt, name, seed, members=(), extra=()):
    """One round: fairseq-train of a new d=16 member on top of ``members``; returns (checkpoint, valid metrics)."""
    save = os.path.join(toy_mt.root, "bdistil", name)
    # TINY_TRAINING's options come first, so the ones given here (lr, architecture) win.
    proc = train(
        toy_mt.data, save, toy_mt.root,
        [*member_options(16), "--lr", "1e-2", "--task", "distillation", "--ensemble-paths", ":".join(toy_mt.teachers),
         "--criterion", "bdistil_residual_kd", "--max-epoch", EPOCHS, "--seed", str(seed),
         "--required-batch-size-multiple", "1",  # validation then scores every sentence in every round
         *(["--bdistil-members", ":".join(members)] if members else []), *extra],
    )
    return os.path.join(save, "checkpoint_last.pt"), last_valid_metrics(proc.stdout + proc.stderr)


def validate(toy_mt, path, overrides="{}"):
    proc = run(
        "fairseq-validate",
        [toy_mt.data, "--user-dir", user_dir(), "--task", "distillation", "--path", path, "--max-tokens", "1000",
         "--required-batch-size-multiple", "1", "--cpu", "--model-overrides", overrides],
        toy_mt.root,
    )
    return last_valid_metrics(proc.stdout + proc.stderr)


@pytest.fixture(scope="session")
def rounds(toy_mt):
    """The rounds, two subprocesses at a time: r1 with i2, then r2 with the averaging baseline's
    validation, then r3 with the decoding of r1."""
    average = os.path.join(toy_mt.root, "bdistil", "average.pt")
    with ThreadPoolExecutor(max_workers=2) as pool:
        independent = pool.submit(train_member, toy_mt, "i2", seed=2)
        r1, m1 = train_member(toy_mt, "r1", seed=1)
        i2, _ = independent.result()
        assert bdistil_cli(["assemble", average, r1, i2, "--combine", "mean"]) == 0
        average_metrics = pool.submit(validate, toy_mt, average)
        r2, m2 = train_member(toy_mt, "r2", seed=2, members=[r1])
        first = pool.submit(_generate, toy_mt, r1, 0)
        r3, m3 = train_member(toy_mt, "r3", seed=3, members=[r1, r2], extra=["--bdistil-connection", "last-hidden"])
        return {"paths": [r1, r2, r3], "metrics": [m1, m2, m3], "average": average, "independent": i2,
                "average_metrics": average_metrics.result(), "first_round_hypotheses": first.result()[0],
                "tau": _median_first_member_confidence(toy_mt, r3)}


def _median_first_member_confidence(toy_mt, path) -> float:
    """An early-stopping threshold between "never" and "always": the median over the validation
    references' positions of member 1's max-probability (teacher-forced), to two decimals."""
    model, task = _load(path, toy_mt.data)
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    sample = dataset.collater([dataset[i] for i in range(len(dataset))])
    net = sample["net_input"]
    with torch.no_grad():
        encoder_out = model.encoder(net["src_tokens"], net["src_lengths"])
        logits, _ = next(model.decoder.member_outputs(net["prev_output_tokens"], encoder_out))
    confidence = torch.softmax(logits, -1).max(-1).values[sample["target"].ne(task.target_dictionary.pad())]
    return round(float(confidence.median()), 2)


def test_kl_to_teacher_falls_with_k_and_boosting_beats_independent_averaging(toy_mt, rounds):
    m1, m2, m3 = rounds["metrics"]
    # each round's prefix is the previous round's model: the logs agree on it
    assert m2["kl_prefix"] == pytest.approx(m1["kl_teacher"], abs=1e-3)
    assert m3["kl_prefix"] == pytest.approx(m2["kl_teacher"], abs=1e-3)
    kl = [m1["kl_teacher"], m2["kl_teacher"], m3["kl_teacher"]]
    assert kl[1] < kl[0] - 0.1, kl  # the second member removes a clear part of what the first misses
    assert kl[2] <= kl[1] + 1e-3, kl  # and the third does not undo it
    assert acceptance(m2, gamma=0.05).accepted
    average = rounds["average_metrics"]
    assert average["kl_prefix"] == pytest.approx(m1["kl_teacher"], abs=1e-3)  # the same first member
    assert m2["kl_teacher"] < average["kl_teacher"] - 0.1, (m2, average)


def _generate(toy_mt, path, k):
    proc = run(
        "fairseq-generate",
        [toy_mt.data, "--user-dir", user_dir(), "--path", path, "--beam", "4", "--batch-size", "64",
         "--required-batch-size-multiple", "1",  # the default 8 leaves out a last batch of 4 sentences
         "--scoring", "sacrebleu", "--cpu", "--model-overrides", f"{{'bdistil_prefix': {k}}}"],
        toy_mt.root,
    )
    hypotheses = dict(re.findall(r"^H-(\d+)\t\S+\t(.*)$", proc.stdout, re.M))
    bleu = float(re.search(r"BLEU = ([\d.]+)", proc.stdout).group(1))
    return hypotheses, bleu


def test_anytime_decoding_with_every_prefix_through_the_cli(toy_mt, rounds):
    r3 = rounds["paths"][2]
    tau = rounds["tau"]
    early_stop = ["--model-overrides", f"{{'bdistil_early_stop_confidence': {tau}}}"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        stopped = pool.submit(run, "fairseq-pdd-generate", [toy_mt.data, "--user-dir", user_dir(), "--path", r3, "--beam", "4",
                                                          "--batch-size", "64", "--cpu", *early_stop], toy_mt.root)
        outputs = list(pool.map(lambda k: _generate(toy_mt, r3, k), (1, 2, 3)))
        stopped = stopped.result().stdout
    for hypotheses, _ in outputs:
        assert len(hypotheses) == 100
    # prefix k of the last round decodes exactly as round k's own checkpoint
    assert rounds["first_round_hypotheses"] == outputs[0][0]
    assert outputs[0][0] != outputs[1][0] != outputs[2][0]
    assert all(bleu > 0 for _, bleu in outputs)
    # early stopping: every sentence decoded, with between 1 and 3 members per token on average
    assert len(re.findall(r"^H-\d+\t", stopped, re.M)) == 100
    mean = float(re.search(rf"^bdistil early stop \(confidence > {tau}\): ([\d.]+) members per hypothesis token on "
                           r"average, of 3$", stopped, re.M).group(1))
    assert 1 < mean < 3, mean


def _beam_search(model, task, sample):
    """fairseq's beam search (beam 4) over ``sample``: ((tokens, score) per hypothesis per sentence, seconds)."""
    from fairseq.sequence_generator import SequenceGenerator

    generator = SequenceGenerator([model], task.target_dictionary, beam_size=4)
    start = time.perf_counter()
    with torch.no_grad():
        hypos = generator.generate([model], sample)
    seconds = time.perf_counter() - start
    return [[(h["tokens"].tolist(), h["score"].item()) for h in sentence] for sentence in hypos], seconds


def test_early_stop_between_the_first_member_and_the_full_prefix(toy_mt, rounds):
    """tau = 1 never stops (= all members), tau = 0 always stops after member 1 (= prefix 1), exactly;
    the median tau uses some members in between (latencies printed; beam 4, 40 sentences)."""
    path, tau = rounds["paths"][2], rounds["tau"]
    full, task = _load(path, toy_mt.data)
    task.load_dataset("test")
    dataset = task.dataset("test")
    sample = dataset.collater([dataset[i] for i in range(40)])
    _beam_search(full, task, sample)  # warm-up, so that the first timing is comparable
    first_member, _ = _load(path, toy_mt.data, bdistil_prefix=1)
    results = {"all members": _beam_search(full, task, sample), "prefix 1": _beam_search(first_member, task, sample)}
    means = {}
    for threshold in (1.0, tau, 0.0):
        model, _ = _load(path, toy_mt.data, bdistil_early_stop_confidence=threshold)
        results[threshold] = _beam_search(model, task, sample)
        counts = model.decoder.early_stop_counts
        means[threshold] = counts["members"] / counts["tokens"]
    print({name: f"{seconds:.2f} s" for name, (_, seconds) in results.items()}, "members per token:", means)
    assert results[1.0][0] == results["all members"][0] and means[1.0] == 3
    assert results[0.0][0] == results["prefix 1"][0] and means[0.0] == 1
    assert 1 < means[tau] < 3, means
    assert results[tau][0] != results["all members"][0]


def _load(path, data, **overrides):
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data, **overrides})
    return models[0].eval(), task


@pytest.mark.parametrize("early_stop", [False, True])
def test_incremental_beam_reordered_decoding_equals_full_forward_scoring(toy_mt, rounds, early_stop):
    """Every member's cached state (and the connection) follows the beam's reordering; with early
    stopping, the rows each member keeps follow it too (teacher-forced scoring applies the same rule)."""
    model, task = _load(rounds["paths"][2], toy_mt.data, bdistil_early_stop_confidence=rounds["tau"] if early_stop else None)
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    sample = dataset.collater([dataset[i] for i in range(6)])
    net, beam, pad = sample["net_input"], 2, task.target_dictionary.pad()
    rows = torch.arange(6).repeat_interleave(beam)  # row = (sentence, beam), as in beam search
    # beam b of sentence s is forced along sentence (s + b)'s reference, so the beams differ
    histories = net["prev_output_tokens"][(rows + torch.arange(beam).repeat(6)) % 6]
    with torch.no_grad():
        full = model(net["src_tokens"][rows], net["src_lengths"][rows], histories)[0]  # (B * beam, T, V)
        encoder_out = model.encoder(net["src_tokens"][rows], net["src_lengths"][rows])
        state, order, members_used = {}, torch.arange(len(rows)), []
        g = torch.Generator().manual_seed(0)
        for t in range(full.shape[1]):
            if t:  # a beam step: each hypothesis continues one of its own sentence's beams
                new_order = rows * beam + torch.randint(0, beam, (len(rows),), generator=g)
                model.decoder.reorder_incremental_state_scripting(state, new_order)
                encoder_out = model.encoder.reorder_encoder_out(encoder_out, new_order)
                order = order[new_order]
            prev = histories[order, : t + 1]
            step = model.decoder(prev, encoder_out, incremental_state=state)[0]
            if early_stop:
                members_used.append(set(model.decoder.get_incremental_state(state, "early_stop")["used"].tolist()))
            real = prev[:, -1].ne(pad)  # padding positions are never decoded
            assert real.any()
            torch.testing.assert_close(step[real, -1], full[order, t][real], atol=1e-5, rtol=1e-5)
    assert "0" not in model.decoder.connections and "2" in model.decoder.connections
    if early_stop:  # at some steps the hypotheses used different numbers of members
        assert any(len(used) > 1 for used in members_used), members_used


def _build(toy_mt, data, members, extra=()):
    from fairseq import options, tasks

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [data, "--user-dir", user_dir(), "--task", "translation", "--source-lang", "src", "--target-lang", "tgt",
                 *member_options(16),
                 "--bdistil-members", ":".join(members), *extra],
    )
    task = tasks.setup_task(args)
    return task.build_model(args)


def test_bad_members_are_refused_with_a_clear_error(toy_mt, rounds, tmp_path):
    r1, r2, r3 = rounds["paths"]
    missing = str(tmp_path / "nothere.pt")
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {re.escape(missing)}"):
        _build(toy_mt, toy_mt.data, [r1, missing])
    # r3's connection reads 16 features of member 2; a teacher as member 2 gives 64
    with pytest.raises(MemberError, match=r"connection size mismatch: member 3 .* 16 -> 16, but member 2 .* gives 64"):
        _build(toy_mt, toy_mt.data, [r1, toy_mt.teachers[0], r3])
    with pytest.raises(MemberError, match=r"trained as member 3 of its ensemble but is listed as member 2"):
        _build(toy_mt, toy_mt.data, [r1, r3])
    with pytest.raises(MemberError, match=r"member 2 .* was trained on top of a different member 1"):
        _build(toy_mt, toy_mt.data, [rounds["independent"], r2])
    with pytest.raises(MemberError, match=r"--bdistil-early-stop-confidence 1.5: a probability threshold in \[0, 1\]"):
        _build(toy_mt, toy_mt.data, [r1], ["--bdistil-early-stop-confidence", "1.5"])
    with pytest.raises(MemberError, match="needs an earlier member"):
        _build(toy_mt, toy_mt.data, [], ["--bdistil-connection", "last-hidden"])
    # a data directory whose dictionaries differ from the members'
    other = tmp_path / "other-bin"
    other.mkdir()
    for name in ("dict.src.txt", "dict.tgt.txt"):
        lines = open(os.path.join(toy_mt.data, name)).read().splitlines()
        lines[0], lines[1] = lines[1], lines[0]
        (other / name).write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"member 1 .* was trained with a different source dictionary"):
        _build(toy_mt, str(other), [r1])


def test_cli_refuses_a_missing_member_and_a_too_long_prefix(toy_mt, rounds, tmp_path):
    r2 = rounds["paths"][1]

    def refused(overrides):
        return run(
            "fairseq-generate",
            [toy_mt.data, "--user-dir", user_dir(), "--path", r2, "--cpu", "--model-overrides", overrides],
            toy_mt.root, expect_failure=True,
        ).stderr

    cases = {"{'bdistil_members': '%s'}" % (tmp_path / "moved.pt"): "checkpoint not found",
             "{'bdistil_prefix': 3}": "this ensemble has 2 members"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for stderr, message in zip(pool.map(refused, cases), cases.values()):
            assert message in stderr, stderr[-2000:]


def test_accept_and_params_commands(toy_mt, rounds, capsys, tmp_path):
    log = tmp_path / "valid.log"
    log.write_text(
        "2026 | INFO | valid | epoch 006 | valid on 'valid' subset | loss 2.1 | kl_teacher 1.3 | kl_prefix 1.7 "
        "| edge 0.01 | ppl 6.29\n"
    )
    assert bdistil_cli(["accept", str(log), "--gamma", "0.05"]) == 3  # edge below gamma
    assert bdistil_cli(["accept", str(log), "--gamma", "0.005"]) == 0
    r1, r2, _ = rounds["paths"]
    capsys.readouterr()
    bdistil_cli(["params", r1])
    bdistil_cli(["params", r2, "--prefix", "1"])
    bdistil_cli(["params", r2])
    one, prefix_one, two = (int(x) for x in capsys.readouterr().out.split())
    model, _ = _load(r2, toy_mt.data)
    first = {id(p): p.numel() for m in (model.encoder.members[0], model.decoder.members[0]) for p in m.parameters()}
    assert one == prefix_one == sum(first.values())  # tied input/output embeddings counted once
    assert two == sum(p.numel() for p in model.parameters())
