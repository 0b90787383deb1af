"""Uncertainty measures tracked during fairseq's own beam search (fairseq glue).

fairseq's ``SequenceGenerator`` already carries one per-row, per-step tensor through beam search: the
attention returned by ``EnsembleModel.forward_decoder``, written to ``attn[:, :, step + 1]``, re-ordered
with the beam, compacted when sentences finish and cut per finished hypothesis into
``hypo["attention"]`` (src_len, L). :class:`MeasuringEnsemble` appends the step's measure columns
(:mod:`fairseq_pdd.decoding.step_uncertainty`) to the models' attention, so they follow every hypothesis for
free; :func:`take_columns` splits them off right after decoding and gives ``hypo["attention"]`` back as
fairseq made it. The models run once, in the beam search itself: nothing is re-scored.

The measures are of the distributions beam search used: with ``--temperature`` they are those of the
tempered models. Whether measured or not, the ensemble (:class:`CheckedEnsemble`) stops the search at the
first NaN log-probability with an error naming the model.
"""
from typing import Callable, List, Optional

import torch
from fairseq.sequence_generator import EnsembleModel, SequenceGenerator

from fairseq_pdd.decoding.step_uncertainty import StepUncertainty


class NonFiniteOutputError(ValueError):
    """A model gives NaN log-probabilities during beam search (reported as a one-line CLI error)."""


class _Capture:
    """Wraps a model's ``get_normalized_probs``; appends ``(logits, result)`` of every call to ``sink``."""

    def __init__(self, get_normalized_probs, sink: list):
        self.inner, self.sink = get_normalized_probs, sink

    def __call__(self, net_output, log_probs, sample=None):
        out = self.inner(net_output, log_probs, sample)
        self.sink.append((net_output[0], out))
        return out


class CheckedEnsemble(EnsembleModel):
    """fairseq's ``EnsembleModel`` that stops the search with :class:`NonFiniteOutputError` naming the model
    (``names``, one per model) whose log-probabilities have a NaN: fairseq would replace the NaN by -inf
    and search on, to an assertion at the length limit or to garbage. Each model's ``(logits, log-probs)``
    of the step are captured; one ``isnan`` of the combined log-probabilities per step (a member's NaN
    reaches them) finds a bad step, the members are checked only then."""

    def __init__(self, models, names: List[str]):
        super().__init__(models)
        self.names = names
        self._captured: list = []
        for model in self.models:
            model.get_normalized_probs = _Capture(model.get_normalized_probs, self._captured)

    def forward_decoder(self, tokens, encoder_outs, incremental_states, temperature: float = 1.0):
        self._captured.clear()
        lprobs, attn = super().forward_decoder(tokens, encoder_outs, incremental_states, temperature)
        if bool(torch.isnan(lprobs).any()):  # one device sync per step
            name = next(name for name, (_, log_probs) in zip(self.names, self._captured)
                        if bool(torch.isnan(log_probs).any()))
            raise NonFiniteOutputError(f"model {name} gives NaN log-probabilities at decoding step "
                                       f"{tokens.size(1) - 1}: its checkpoint holds NaN weights or its "
                                       f"activations overflow")
        return lprobs, attn


class MeasuringEnsemble(CheckedEnsemble):
    """A :class:`CheckedEnsemble` whose decoder step also returns the measure columns (see module doc).

    ``outputs_of`` turns the step's captured ``[(logits (rows, 1, K), log-probs (rows, 1, K)), ...]``
    (one per model) into what ``measures.step`` takes.
    """

    def __init__(self, models, names: List[str], measures: StepUncertainty, outputs_of: Callable[[list], object],
                 eos: int):
        super().__init__(models, names)
        self.measures, self.outputs_of, self.eos = measures, outputs_of, eos

    def forward_decoder(self, tokens, encoder_outs, incremental_states, temperature: float = 1.0):
        lprobs, attn = super().forward_decoder(tokens, encoder_outs, incremental_states, temperature)
        columns = self.measures.step(self.outputs_of(self._captured), tokens, self.eos)
        self._captured.clear()
        return lprobs, columns if attn is None else torch.cat([attn.to(columns.dtype), columns], 1)

    def reorder_incremental_state(self, incremental_states, new_order):
        self.measures.reorder(new_order)
        super().reorder_incremental_state(incremental_states, new_order)


def ensemble_outputs(captured: list) -> List[torch.Tensor]:
    """The members' log-probabilities (rows, K) at this step."""
    return [log_probs[:, -1, :] for _, log_probs in captured]


def install(generator, names: List[str], measures: Optional[StepUncertainty] = None,
            outputs_of: Optional[Callable[[list], object]] = None, eos: Optional[int] = None) -> bool:
    """Replace ``generator``'s ensemble by a :class:`CheckedEnsemble` of the same models (``names`` for error
    messages), or, given ``measures`` (with ``outputs_of`` and ``eos``), a :class:`MeasuringEnsemble`.

    Only fairseq's plain ``SequenceGenerator`` with its plain ``EnsembleModel`` is handled (not, e.g.,
    the alignment variant of ``--print-alignment``); returns False, changing nothing, for any other.
    """
    if not isinstance(generator, SequenceGenerator) or type(generator.model) is not EnsembleModel:
        return False
    models = list(generator.model.models)
    ensemble = (CheckedEnsemble(models, names) if measures is None
                else MeasuringEnsemble(models, names, measures, outputs_of, eos))
    generator.model = ensemble.eval()
    return True


def take_columns(hypos, nbest: int, channels: int) -> List[torch.Tensor]:
    """The measure columns (L, C) of the first ``nbest`` hypotheses of every source, in order; each
    hypothesis' ``attention`` is given back without them (empty when the models return no attention)."""
    out = []
    for beam in hypos:
        for rank, hypo in enumerate(beam):
            attention = hypo["attention"]
            if attention.dim() != 2 or attention.size(0) < channels:
                raise RuntimeError(f"hypothesis without measure columns (attention of shape "
                                   f"{tuple(attention.shape)}); was it decoded by MeasuringEnsemble?")
            if rank < nbest:
                out.append(attention[-channels:].t())
            hypo["attention"] = attention[:-channels] if attention.size(0) > channels else torch.empty(0)
    return out
