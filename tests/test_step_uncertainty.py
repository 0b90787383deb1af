"""Measures tracked step by step through a re-ordered beam equal those of the finished hypotheses
re-scored teacher-forced (the oracles: :class:`EnsembleHypothesisAccumulator` and
:func:`dirichlet_hypothesis_measures` on the distributions each hypothesis' ancestors saw)."""
import pytest
import torch

from fairseq_pdd.decoding.step_uncertainty import DirichletStepUncertainty, EnsembleStepUncertainty, pad_columns
from fairseq_pdd.decoding.uncertainty import EnsembleHypothesisAccumulator, dirichlet_hypothesis_measures

EOS, BOS, K, ROWS, STEPS = 2, 2, 11, 6, 7


def simulate(measures, outputs_of_step, seed):
    """A beam of ROWS rows for STEPS steps with random re-ordering; after every step the row
    ``step % ROWS`` is finished with EOS. Returns (hypotheses [(tokens (L,), step outputs per position)],
    their columns [(L, C)])."""
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.full((ROWS, 1), BOS, dtype=torch.long)
    history = [[] for _ in range(ROWS)]  # per row: the outputs each position was predicted from
    columns = [[] for _ in range(ROWS)]
    finished, finished_columns = [], []
    for step in range(STEPS):
        outputs = outputs_of_step(gen)
        step_columns = measures.step(outputs, prefix, EOS)
        r = step % ROWS
        tokens = torch.cat([prefix[r, 1:], torch.tensor([EOS])])
        finished.append((tokens, history[r] + [(outputs, r)]))
        finished_columns.append(torch.stack(columns[r] + [step_columns[r]]))
        parents = torch.randint(0, ROWS, (ROWS,), generator=gen)
        chosen = torch.randint(3, K, (ROWS,), generator=gen)  # never EOS inside a hypothesis
        history = [history[p] + [(outputs, p)] for p in parents.tolist()]
        columns = [columns[p] + [step_columns[p]] for p in parents.tolist()]
        prefix = torch.cat([prefix[parents], chosen.unsqueeze(1)], 1)
        measures.reorder(parents)
    return finished, finished_columns


def padded_tokens(finished):
    tokens = torch.nn.utils.rnn.pad_sequence([t for t, _ in finished], batch_first=True, padding_value=1)
    return tokens, tokens.ne(1)


def assert_measures_equal(got, want, mask):
    for part_got, part_want in zip(got, want):
        assert part_got.keys() == part_want.keys()
        for key in part_want:
            g, w = part_got[key], part_want[key]
            if g.dim() == 2:
                g, w = g[mask], w[mask]
            torch.testing.assert_close(g.float(), w.float(), rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("members", [1, 3])
def test_ensemble_steps_equal_teacher_forced_rescoring(members):
    def outputs_of_step(gen):
        return [torch.log_softmax(3 * torch.randn(ROWS, K, generator=gen), -1) for _ in range(members)]

    measures = EnsembleStepUncertainty(members)
    finished, columns = simulate(measures, outputs_of_step, seed=members)
    tokens, mask = padded_tokens(finished)
    got = measures.hypothesis_measures(pad_columns(columns), mask)

    oracle = EnsembleHypothesisAccumulator(tokens, mask)
    for m in range(members):
        rows = [torch.stack([outputs[m][row] for outputs, row in hist]) for _, hist in finished]
        oracle.add(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True))
    assert_measures_equal(got, oracle.measures(), mask)
    assert mask.sum(-1).unique().numel() == STEPS  # hypotheses of every length 1..STEPS, padded together


def test_dirichlet_steps_equal_teacher_forced_rescoring():
    def outputs_of_step(gen):
        return torch.exp(2 * torch.randn(ROWS, K, generator=gen)) + 0.5

    measures = DirichletStepUncertainty()
    finished, columns = simulate(measures, outputs_of_step, seed=0)
    tokens, mask = padded_tokens(finished)
    got = measures.hypothesis_measures(pad_columns(columns), mask)
    alpha = torch.nn.utils.rnn.pad_sequence(
        [torch.stack([outputs[row] for outputs, row in hist]) for _, hist in finished], batch_first=True,
        padding_value=1.0)
    assert_measures_equal(got, dirichlet_hypothesis_measures(alpha, tokens, mask), mask)


def test_bad_columns_and_nan_are_named():
    measures = DirichletStepUncertainty()
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"columns of shape \(2, 3, 4\) do not match the mask \(2, 3\) and 9"):
        measures.hypothesis_measures(torch.ones(2, 3, 4), mask)
    alpha = torch.ones(2, K)
    alpha[1, 4] = float("nan")
    columns = measures.step(alpha, torch.full((2, 1), BOS), EOS)
    with pytest.raises(ValueError, match="NaN at hypothesis tokens in total_uncertainty"):
        measures.hypothesis_measures(columns.unsqueeze(1), mask[:, :1])
    with pytest.raises(RuntimeError, match="past the first step without a previous step"):
        DirichletStepUncertainty().step(alpha, torch.full((2, 2), BOS), EOS)
