"""Length grouping of hypotheses for teacher-forced re-scoring (pure torch)."""
import pytest
import torch

from fairseq_pdd.decoding.rescoring import MAX_PADDED_RATIO, HypothesisBatch, length_buckets


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_tokens", [1, 16, 200, 10 ** 6])
def test_length_buckets_partition_and_bounds(seed, max_tokens):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (97,), generator=g)
    lengths[torch.randint(0, 97, (3,), generator=g)] = 201  # runaway hypotheses
    groups = length_buckets(lengths, max_tokens)
    rows = torch.cat(groups)
    assert sorted(rows.tolist()) == list(range(97))  # every row exactly once
    assert lengths[rows].diff().ge(0).all()  # ascending lengths
    for group in groups:
        n, longest, real = group.numel(), int(lengths[group].max()), int(lengths[group].sum())
        assert n >= 1
        if n > 1:
            assert n * longest <= max_tokens
            assert n * longest <= MAX_PADDED_RATIO * real
    if max_tokens == 10 ** 6:  # the runaways never pad the short rows
        assert all(int(lengths[g].min()) == 201 for g in groups if int(lengths[g].max()) == 201)


def test_length_buckets_empty_and_equal_lengths():
    assert length_buckets(torch.zeros(0, dtype=torch.long), 10) == []
    groups = length_buckets(torch.full((10,), 4), 12)
    assert [g.tolist() for g in groups] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]  # stable order


def test_select_trims_to_the_longest_selected_row():
    tokens = torch.tensor([[5, 6, 2, 1, 1], [7, 2, 1, 1, 1], [5, 5, 5, 5, 2]])
    batch = HypothesisBatch(torch.tensor([0, 0, 1]), [0, 1, 0], tokens, tokens.ne(1))
    sub = batch.select(torch.tensor([1, 0]))
    assert sub.tokens.tolist() == [[7, 2, 1], [5, 6, 2]]
    assert sub.mask.tolist() == [[True, True, False], [True, True, True]]
    assert sub.ranks == [1, 0] and sub.source_rows.tolist() == [0, 0]
