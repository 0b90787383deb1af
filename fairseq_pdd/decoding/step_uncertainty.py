"""Uncertainty measures tracked inside beam search, one decoding step at a time (pure torch).

At decoding step t every beam row holds a prefix ``y_<t`` and the models' distributions over the next
token. The measures of a finished hypothesis ``y_0 .. y_{L-1}`` (EOS last) are of two kinds:

* *distribution* measures at position t (:data:`~fairseq_pdd.decoding.uncertainty.DIRICHLET_TOKEN_KEYS`, and for
  ensembles the expectation-of-products variants) depend only on ``y_<t``: they are computed at step t
  for every row;
* *chosen-token* values at position t (the members' ``log p_m(y_t)``, or the student's ``alpha_y`` and
  ``a0``) depend on ``y_t``, which is known one step later: at step t + 1 the row's last token is
  ``y_t``, and the distribution its parent row had at step t gives them. For the final EOS they are
  taken at the step that chooses it.

:meth:`StepUncertainty.step` returns, per row, the C columns

    [ distribution measures at t | chosen-token values of y_{t-1} | chosen-token values of EOS at t ]

which the decoder carries along the beam (:mod:`fairseq_pdd.decoding.beam_uncertainty`);
:meth:`StepUncertainty.hypothesis_measures` turns the columns (H, L, C) of finished hypotheses into the
token (H, L) and sequence (H,) measures of :mod:`fairseq_pdd.decoding.uncertainty`, equal to those of re-scoring
the hypotheses teacher-forced (:mod:`fairseq_pdd.decoding.rescoring`) without running the models again.

Between steps the beam is re-ordered: :meth:`StepUncertainty.reorder` gets fairseq's ``new_order`` (new
row r continues old row ``new_order[r]``). The previous step's distributions are kept as they are and
only the chosen entries are read through that index, so nothing (rows, K) is copied. Memory: those
previous distributions live one step longer (for an ensemble M x rows x K, as large as the stack of
member log-probabilities fairseq builds at every step itself); a step works in five (rows, K) buffers
whatever M is (three on the Triton path), as members are streamed with their EP weights
(:class:`~fairseq_pdd.distill.ensemble_stats.EnsembleAccumulator`), and the buffers are kept from step to step
(:class:`~fairseq_pdd.distill.ensemble_stats.Workspace`).
"""
from typing import List, Optional, Sequence, Tuple

import torch

from fairseq_pdd.distill.ensemble_stats import EnsembleAccumulator, Workspace
from fairseq_pdd.distill.fused import compute_dtype
from fairseq_pdd.decoding.uncertainty import (
    DIRICHLET_TOKEN_KEYS,
    EP_TOKEN_KEYS,
    LOG_PROB_FLOOR,
    Measures,
    dirichlet_measures_of,
    dirichlet_token_measures,
    ensemble_measures_of,
    ensemble_token_measures,
)


class StepUncertainty:
    """Per-step measure columns of one model kind; see the module docstring for the layout."""

    #: names of the distribution columns, in order
    distribution_keys: Tuple[str, ...] = ()
    #: chosen-token values per token
    chosen_width: int = 0

    def __init__(self) -> None:
        self._previous = None  #: the previous step's outputs (rows_prev, ...)
        self._order: Optional[torch.Tensor] = None  #: current row -> previous row

    @property
    def channels(self) -> int:
        """C, the number of columns per row and step."""
        return len(self.distribution_keys) + 2 * self.chosen_width

    def step(self, outputs, tokens: torch.Tensor, eos: int) -> torch.Tensor:
        """The columns (rows, C) of this step, float32.

        ``outputs``: the models' distributions at this step (see the subclass); ``tokens`` (rows, t + 1):
        the rows' prefixes as fairseq passes them to the decoder (BOS first, so t = 0 at the first step).
        """
        rows = tokens.size(0)
        if tokens.size(1) == 1:  # first step: no previous token
            order, previous = None, torch.zeros(rows, self.chosen_width, device=tokens.device)
        else:
            if self._previous is None:
                raise RuntimeError("StepUncertainty.step() past the first step without a previous step")
            order = self._order if self._order is not None else torch.arange(rows, device=tokens.device)
            previous = self._chosen(self._previous, order, tokens[:, -1])
        self._advance(previous, order)
        columns = [self._distribution(outputs), previous,
                   self._chosen(outputs, None, torch.full((rows,), eos, dtype=torch.long, device=tokens.device))]
        self._previous, self._order = outputs, None
        return torch.cat([c.float() for c in columns], 1)

    def reorder(self, new_order: torch.Tensor) -> None:
        """The beam was re-ordered: current row r continues row ``new_order[r]``."""
        self._order = new_order if self._order is None else self._order[new_order]

    def hypothesis_measures(self, columns: torch.Tensor, mask: torch.Tensor, validate: bool = True
                            ) -> Tuple[Measures, Measures]:
        """Token measures (H, L) and sequence measures (H,) of finished hypotheses from their columns
        (H, L, C) (one per position, padded) and ``mask`` (H, L) of their tokens, EOS last."""
        if columns.dim() != 3 or columns.size(-1) != self.channels or columns.shape[:2] != mask.shape:
            raise ValueError(f"columns of shape {tuple(columns.shape)} do not match the mask {tuple(mask.shape)} "
                             f"and {self.channels} channels")
        d, w = len(self.distribution_keys), self.chosen_width
        distribution = {key: columns[..., i] for i, key in enumerate(self.distribution_keys)}
        previous, at_eos = columns[..., d:d + w], columns[..., d + w:]
        # position t takes the previous-token values of column t + 1; the last position its EOS values
        shifted = torch.cat([previous[:, 1:], previous[:, :1]], 1)
        positions = torch.arange(mask.size(1), device=mask.device)
        last = positions.unsqueeze(0) == (mask.sum(-1, keepdim=True) - 1)
        chosen = torch.where(last.unsqueeze(-1), at_eos, shifted)
        return self._measures(distribution, chosen, mask, validate)

    # per model kind -------------------------------------------------------------------------------
    def _distribution(self, outputs) -> torch.Tensor:
        raise NotImplementedError

    def _chosen(self, outputs, order: Optional[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """Chosen-token values (rows, chosen_width) of ``tokens`` (rows,) in ``outputs``' rows ``order``."""
        raise NotImplementedError

    def _advance(self, previous: torch.Tensor, order: Optional[torch.Tensor]) -> None:
        """Update per-row state with the previous token's values (``order`` None at the first step)."""

    def _measures(self, distribution: Measures, chosen: torch.Tensor, mask: torch.Tensor, validate: bool):
        raise NotImplementedError


class EnsembleStepUncertainty(StepUncertainty):
    """An ensemble of M members; ``outputs`` is the list of their log-probabilities (rows, K).

    Distribution columns: the five measures of :func:`~fairseq_pdd.decoding.uncertainty.ensemble_token_measures`
    and its EP variants, whose predictive ``q_t = sum_m softmax_m(c_m) p_m`` weighs the members by
    ``c_m = sum_{s<t} log p_m(y_s)``, the per-row prefix log-probabilities kept here (float64, (rows, M)).
    Chosen-token values: ``log p_m(y)`` for every member. Where :mod:`fairseq_pdd.distill.backend` chooses
    Triton, a step is one kernel per member (the sums, the member's entropy and its weighted share of ``q``,
    half-precision log-probabilities read as they are) and one that finishes the nine columns' row sums
    (:mod:`fairseq_pdd.distill.triton_stats`); the rest is (rows,) arithmetic.
    """

    distribution_keys = DIRICHLET_TOKEN_KEYS + EP_TOKEN_KEYS

    def __init__(self, num_models: int) -> None:
        super().__init__()
        self.chosen_width = num_models
        self._prefix: Optional[torch.Tensor] = None
        self._workspace = Workspace()  #: the step's (rows, K) buffers, re-used from step to step

    def _advance(self, previous, order):
        if order is None:
            self._prefix = torch.zeros(previous.shape, dtype=torch.float64, device=previous.device)
        else:
            self._prefix = self._prefix[order] + previous.double().clamp(min=LOG_PROB_FLOOR)

    def _distribution(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        weights = torch.softmax(self._prefix, dim=1).to(compute_dtype(outputs[0].dtype))  # (rows, M)
        acc = EnsembleAccumulator(self._workspace)
        for m, log_probs in enumerate(outputs):
            acc.add(log_probs, return_probs=False, weight=weights[:, m])
        measures = ensemble_token_measures(acc.finalize())
        return torch.stack([measures[key] for key in self.distribution_keys], 1)

    def _chosen(self, outputs, order, tokens):
        rows = torch.arange(tokens.numel(), device=tokens.device) if order is None else order
        return torch.stack([lp[rows, tokens].float() for lp in outputs], 1)

    def _measures(self, distribution, chosen, mask, validate):
        return ensemble_measures_of(distribution, chosen.permute(2, 0, 1), mask, validate)


class DirichletStepUncertainty(StepUncertainty):
    """A Dirichlet student; ``outputs`` is its concentrations ``alpha`` (rows, K).

    Distribution columns: :data:`~fairseq_pdd.decoding.uncertainty.DIRICHLET_TOKEN_KEYS`; chosen-token values:
    ``alpha_y`` and ``a0``.
    """

    distribution_keys = DIRICHLET_TOKEN_KEYS
    chosen_width = 2

    def __init__(self) -> None:
        super().__init__()
        self._workspace = Workspace()  #: the step's (rows, K) buffers, re-used from step to step

    def _distribution(self, alpha: torch.Tensor) -> torch.Tensor:
        # NaN shows in the hypothesis' measures
        measures = dirichlet_token_measures(alpha, validate=False, workspace=self._workspace)
        return torch.stack([measures[key] for key in self.distribution_keys], 1)

    def _chosen(self, alpha, order, tokens):
        if order is not None:
            alpha = alpha[order]
        return torch.stack([alpha.gather(1, tokens.unsqueeze(1)).squeeze(1), alpha.sum(-1)], 1)

    def _measures(self, distribution, chosen, mask, validate):
        return dirichlet_measures_of(distribution, chosen[..., 0], chosen[..., 1], mask, validate)


def pad_columns(columns: List[torch.Tensor]) -> torch.Tensor:
    """Hypotheses' columns, each (L_h, C), right-padded with zeros to (H, max L_h, C)."""
    return torch.nn.utils.rnn.pad_sequence(columns, batch_first=True)
