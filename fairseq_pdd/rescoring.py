"""Teacher-forced re-scoring of a batch of hypotheses with each model (fairseq glue).

Every uncertainty measure of a hypothesis depends only on its tokens and the models' per-step
distributions given the prefix, so instead of tracking them inside beam search the n-best lists
(and, optionally, the references) are re-scored in one batched, teacher-forced forward pass per
model. The encoder runs once per source and is re-ordered to the H hypothesis rows.
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


def shifted_prefix(tokens: torch.Tensor, mask: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    """fairseq's ``prev_output_tokens``: EOS followed by the tokens, shifted right, pad kept."""
    prev = torch.full_like(tokens, pad)
    prev[:, 0] = eos
    prev[:, 1:] = tokens[:, :-1]
    return prev.masked_fill(~mask, pad)


@torch.inference_mode()
def teacher_forced_logits(model, net_input: dict, batch: HypothesisBatch, eos: int, pad: int) -> torch.Tensor:
    """Decoder logits (H, L, K) of ``model`` for every hypothesis row, given its own prefix."""
    encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
    encoder_out = model.encoder.reorder_encoder_out(encoder_out, batch.source_rows)
    prev = shifted_prefix(batch.tokens, batch.mask, eos, pad)
    return model.decoder(prev, encoder_out=encoder_out)[0]
