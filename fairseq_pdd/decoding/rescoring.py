"""Teacher-forced re-scoring of a batch of hypotheses with each model (fairseq glue).

Every uncertainty measure of a hypothesis depends only on its tokens and the models' per-step
distributions given the prefix, so instead of tracking them inside beam search the n-best lists
(and, optionally, the references) are re-scored teacher-forced, batched. The encoder runs once per
source and model (:func:`encode`) and is re-ordered to the hypothesis rows. Hypotheses are grouped
by length (:func:`length_buckets`) so that a few long ones (a runaway hypothesis is as long as
``--max-len-b`` allows) do not pad every other row, and so that the (rows, length, K) logits of one
group stay within a token budget whatever the n-best size.
"""
from dataclasses import dataclass
from typing import List, Sequence

import torch


@dataclass
class HypothesisBatch:
    """H hypotheses of a fairseq batch, right-padded: row h belongs to source row ``source_rows[h]``."""

    source_rows: torch.Tensor  #: (H,) index into the batch's sources
    ranks: List[int]  #: rank in the n-best (-1 for a reference)
    tokens: torch.Tensor  #: (H, L) target tokens ending with EOS, padded with pad
    mask: torch.Tensor  #: (H, L) True at real tokens (EOS included)

    def select(self, rows: torch.Tensor) -> "HypothesisBatch":
        """The hypotheses ``rows`` (h,), trimmed to their longest length."""
        mask = self.mask[rows]
        length = int(mask.sum(-1).max()) if rows.numel() else 0
        return HypothesisBatch(self.source_rows[rows], [self.ranks[r] for r in rows.tolist()],
                               self.tokens[rows, :length], mask[:, :length])


def from_nbest(hypos: Sequence[Sequence[dict]], nbest: int, pad: int) -> HypothesisBatch:
    """The first ``nbest`` hypotheses of each source, as returned by fairseq's SequenceGenerator."""
    rows, ranks, seqs = [], [], []
    for i, beam in enumerate(hypos):
        for rank, hypo in enumerate(beam[:nbest]):
            rows.append(i)
            ranks.append(rank)
            seqs.append(hypo["tokens"])
    if not seqs:
        raise ValueError("no hypotheses to re-score (empty batch)")
    tokens = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad)
    return HypothesisBatch(torch.tensor(rows, device=tokens.device), ranks, tokens, tokens.ne(pad))


def from_references(target: torch.Tensor, pad: int) -> HypothesisBatch:
    """The batch's references (B, L) as rank -1 hypotheses, for forced decoding."""
    rows = torch.arange(target.size(0), device=target.device)
    return HypothesisBatch(rows, [-1] * target.size(0), target, target.ne(pad))


#: A length group's padded positions may be at most this many times its real tokens.
MAX_PADDED_RATIO = 1.5


def length_buckets(lengths: torch.Tensor, max_tokens: int) -> List[torch.Tensor]:
    """Row indices grouped by length: ascending, each group of n rows with longest length L having
    ``n * L <= max_tokens`` and ``n * L <= MAX_PADDED_RATIO * sum(lengths)``.

    ``lengths`` (H,) >= 1; every row is in exactly one group, a group has at least one row (a row
    longer than ``max_tokens`` is a group of its own). The first bound caps the (n, L, K) logits of a
    group; the second keeps the compute spent on padding within half of the real work however far the
    longest hypothesis runs away.
    """
    order = torch.argsort(lengths.cpu(), stable=True)
    sorted_lengths = lengths.cpu()[order].tolist()
    groups, start, real = [], 0, 0
    for i, length in enumerate(sorted_lengths):  # ascending: ``length`` is the group's longest so far
        padded = (i - start + 1) * length
        if i > start and (padded > max_tokens or padded > MAX_PADDED_RATIO * (real + length)):
            groups.append(order[start:i])
            start, real = i, 0
        real += length
    if sorted_lengths:
        groups.append(order[start:])
    return [g.to(lengths.device) for g in groups]


def shifted_prefix(tokens: torch.Tensor, mask: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    """fairseq's ``prev_output_tokens``: EOS followed by the tokens, shifted right, pad kept."""
    prev = torch.full_like(tokens, pad)
    prev[:, 0] = eos
    prev[:, 1:] = tokens[:, :-1]
    return prev.masked_fill(~mask, pad)


@torch.inference_mode()
def encode(model, net_input: dict):
    """``model``'s encoder output for the batch's B sources (fairseq's encoder-out dict)."""
    return model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])


@torch.inference_mode()
def teacher_forced_logits(model, encoder_out, batch: HypothesisBatch, eos: int, pad: int) -> torch.Tensor:
    """Decoder logits (H, L, K) of ``model`` for every hypothesis row, given its own prefix.

    ``encoder_out`` is :func:`encode`'s output for the batch's sources; it is re-ordered to the rows
    (into a copy: the same output serves every length group).
    """
    if isinstance(encoder_out, dict):  # some encoders (the VGG-Transformer's) re-order their dict in place
        encoder_out = dict(encoder_out)
    encoder_out = model.encoder.reorder_encoder_out(encoder_out, batch.source_rows)
    prev = shifted_prefix(batch.tokens, batch.mask, eos, pad)
    return model.decoder(prev, encoder_out=encoder_out)[0]
