"""The four ensemble-distillation criteria as fairseq criteria (thin glue over :mod:`fairseq_pdd.distill.losses`).

They read the ensemble's streamed statistics that the ``distillation`` task attaches to each sample
(``sample["ensemble_stats"]``, over the non-padding target positions in row-major order), select
the same positions of the student's logits, and sum the per-token loss. ``sample_size`` is the
number of target tokens (or sentences with ``--sentence-avg``), as for fairseq's cross-entropy.

Logged (all sums, so ``logging_outputs_can_be_summed``; reported per token):
``loss`` (bits, like fairseq), ``nll_loss``/``ppl`` of the student's predictive on the references
(the Dirichlet mean ``alpha / a0``, never the softmax mode), ``ensemble_mkl``, ``ensemble_epkl``,
``ensemble_mi``, ``ensemble_precision`` (the proxy's beta0) and ``ensemble_log_precision``, and for
Dirichlet students ``precision`` (a0) and ``log_precision``. The logged precisions are those of the
Dirichlets actually used: offsets included, and never changed in place.
"""
import math
from dataclasses import dataclass, field

import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from fairseq_pdd.distill import losses
from fairseq_pdd.distill.dirichlet import PARAMETRIZATIONS, TARGET_CONCENTRATIONS, concentrations, proxy_precision
from fairseq_pdd.distill.ensemble_stats import EnsembleStatistics

STATS_KEY = "ensemble_stats"
#: In training with ``--temper-student``: the annealed temperature T that divides the student's logits.
STUDENT_TEMPERATURE_KEY = "student_temperature"
ENSEMBLE_LOGS = ("ensemble_mkl", "ensemble_epkl", "ensemble_mi", "ensemble_precision", "ensemble_log_precision")
STUDENT_LOGS = ("precision", "log_precision")


class NonFiniteError(FloatingPointError):
    """The student's logits or loss are NaN/inf."""


@dataclass
class DistillationCriterionConfig(FairseqDataclass):
    sentence_avg: bool = II("optimization.sentence_avg")


@dataclass
class MeanDistillationConfig(DistillationCriterionConfig):
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "smooth the ensemble mean towards uniform: (1 - eps) pbar + eps / K"},
    )


@dataclass
class DirichletDistillationConfig(DistillationCriterionConfig):
    parametrization: ChoiceEnum(PARAMETRIZATIONS) = field(
        default="exp", metadata={"help": "alpha = f(z) + model_offset with f = exp or softplus"}
    )
    model_offset: float = field(
        default=1.0, metadata={"help": "added to f(z) to give the Dirichlet parameters (authors' default: 0)"}
    )
    divide_by_precision: bool = field(
        default=False,
        metadata={"help": "divide each token's loss by the student's precision a0 (detached): the same minimiser "
                  "per token, a gradient scale independent of a0 (EnD2 from scratch, docs/criteria.md)"},
    )


@dataclass
class ProxyDistillationConfig(DirichletDistillationConfig):
    target_concentration: ChoiceEnum(TARGET_CONCENTRATIONS) = field(
        default="mkl",
        metadata={"help": "proxy precision beta0 = (K-1)/(2 MKL + eps) (mkl) or (K-1)/(EPKL + eps) (epkl)"},
    )
    target_offset: float = field(
        default=1.0, metadata={"help": "proxy parameters beta = beta0 pbar + target_offset"}
    )
    max_target_precision: float = field(
        default=0.0,
        metadata={"help": "cap the proxy precision: beta0 = min(beta0, this); 0: no cap (the forward KL to the "
                  "proxy from scratch, docs/criteria.md)"},
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "smooth the ensemble mean towards uniform: (1 - eps) pbar + eps / K"},
    )


@dataclass
class ReverseKLProxyConfig(ProxyDistillationConfig):
    model_offset: float = field(
        default=0.0,
        metadata={"help": "added to f(z) to give the Dirichlet parameters; 0 (the authors' code default) for "
                  "PD-EnD2: with 1 the students wrote repetition loops at K = 3352 (docs/errors.md)"},
    )


class _DistillationCriterion(FairseqCriterion):
    """Common forward pass and logging; subclasses give ``token_loss`` and the predictive."""

    #: The task must attach teacher statistics (it refuses to run without --ensemble-paths).
    needs_ensemble = True
    #: Whether the student's logits parametrize a Dirichlet (its predictive is alpha / a0).
    dirichlet = False
    #: Whether ``token_loss`` reads ``stats.mean_log_probs`` (a teacher cache then rebuilds it).
    reads_mean_log_probs = False
    #: Whether the student's logits are divided by ``sample[STUDENT_TEMPERATURE_KEY]`` when present.
    reads_student_temperature = True

    def __init__(self, task, cfg):
        super().__init__(task)
        self.cfg = cfg
        self.sentence_avg = cfg.sentence_avg

    def mean_probs(self, stats: EnsembleStatistics) -> torch.Tensor:
        eps = getattr(self.cfg, "label_smoothing", 0.0)
        if eps == 0.0:
            return stats.mean_probs
        return stats.mean_probs * (1.0 - eps) + eps / stats.num_classes

    def token_loss(self, logits, stats: EnsembleStatistics, logit_scale: float = 1.0):
        """(per-token loss (N,), log-normaliser of the predictive (N,)) for the logits ``logit_scale * logits``
        (N, K), the gradient with respect to ``logits`` (:mod:`fairseq_pdd.distill.losses`)."""
        raise NotImplementedError

    def weighted_token_losses(self, per_token: torch.Tensor, log_norm: torch.Tensor) -> torch.Tensor:
        """The per-token losses (N,) as summed into the loss; ``log_norm`` is the predictive's log-normaliser."""
        return per_token

    def target_log_numerator(self, target_logits: torch.Tensor, num_classes: int) -> torch.Tensor:
        """log of the predictive's unnormalised mass at the reference tokens (N,)."""
        return target_logits

    def forward(self, model, sample, reduce=True):
        stats = sample.get(STATS_KEY)
        if stats is None:
            raise RuntimeError(
                f"criterion '{self.__class__.__name__}' needs ensemble statistics in each sample: "
                "train with --task distillation (or asr_distillation) and --ensemble-paths"
            )
        net_output = model(**sample["net_input"])
        target = model.get_targets(sample, net_output)
        mask = target.ne(self.padding_idx)
        logits = net_output[0][mask]
        # the student's logits at temperature T are z / T: the losses scale them as they read them
        logit_scale = 1.0 / sample.get(STUDENT_TEMPERATURE_KEY, 1.0)
        if logits.shape != stats.mean_probs.shape:
            raise ValueError(
                f"student output {tuple(logits.shape)} (tokens x classes) does not match the "
                f"ensemble statistics {tuple(stats.mean_probs.shape)}: the student's and the "
                "teachers' target vocabularies differ"
            )
        per_token, log_norm = self.token_loss(logits, stats, logit_scale)
        loss = self.weighted_token_losses(per_token, log_norm).sum()
        if not torch.isfinite(loss.detach()).item():
            raise NonFiniteError(
                f"non-finite distillation loss (student logits finite: "
                f"{bool(torch.isfinite(logits).all())}) on sample ids {sample['id'].tolist()[:20]}"
            )
        with torch.no_grad():
            tgt = target[mask]
            target_logits = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).float() * logit_scale
            nll = (log_norm - self.target_log_numerator(target_logits, logits.shape[-1])).sum()
            logging_output = self.logging_output(sample, loss, nll, stats, log_norm)
        return loss, logging_output["sample_size"], logging_output

    def logging_output(self, sample, loss, nll, stats: EnsembleStatistics, log_norm) -> dict:
        nsentences = sample["target"].size(0)
        precision = self.proxy_precision(stats)
        out = {
            "loss": loss.data,
            "nll_loss": nll.data,
            "ntokens": sample["ntokens"],
            "nsentences": nsentences,
            "sample_size": nsentences if self.sentence_avg else sample["ntokens"],
            "ensemble_mkl": stats.mkl.sum(),
            "ensemble_epkl": stats.epkl.sum(),
            "ensemble_mi": stats.mutual_information.sum(),
            "ensemble_precision": precision.sum(),
            "ensemble_log_precision": precision.log().sum(),
        }
        if self.dirichlet:
            out["precision"] = log_norm.exp().sum()
            out["log_precision"] = log_norm.sum()
        return out

    def proxy_precision(self, stats: EnsembleStatistics) -> torch.Tensor:
        mode = getattr(self.cfg, "target_concentration", "mkl")
        cap = getattr(self.cfg, "max_target_precision", 0.0)
        return proxy_precision(stats.mkl, stats.epkl, stats.num_classes, mode, cap)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        sample_size = total("sample_size")
        ntokens = total("ntokens")
        metrics.log_scalar("loss", total("loss") / sample_size / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", total("nll_loss") / ntokens / math.log(2), ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        for key in ENSEMBLE_LOGS + STUDENT_LOGS:
            if any(key in log for log in logging_outputs):
                metrics.log_scalar(key, total(key) / ntokens, ntokens, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


class _DirichletCriterion(_DistillationCriterion):
    dirichlet = True

    def weighted_token_losses(self, per_token, log_norm):
        """With ``--divide-by-precision``: ``L_t / a0_t``, a0 detached (``log_norm`` is ``log a0``). Each token's
        minimiser is unchanged; its gradient no longer grows with the student's precision (for exp it is about
        a0 times the error of the mean), so tokens with a huge a0 do not dominate the batch."""
        if not self.cfg.divide_by_precision:
            return per_token
        return per_token * torch.exp(-log_norm.detach()).to(per_token.dtype)

    def target_log_numerator(self, target_logits, num_classes):
        alpha = concentrations(target_logits, self.cfg.parametrization, self.cfg.model_offset, num_classes)
        return alpha.log()


@register_criterion("rkl_dirichlet_proxy_distillation", dataclass=ReverseKLProxyConfig)
class ReverseKLProxyDistillation(_DirichletCriterion):
    """PD-EnD2: ``KL(Dir(alpha) || Dir(B pbar + 1)) / B``, ``B = beta0 + K * target_offset``."""

    def token_loss(self, logits, stats, logit_scale=1.0):
        scale = self.proxy_precision(stats) + stats.num_classes * self.cfg.target_offset
        return losses.rkl_proxy_loss(
            logits, self.mean_probs(stats), scale, self.cfg.parametrization, self.cfg.model_offset, logit_scale
        )


@register_criterion("dirichlet_proxy_distillation", dataclass=ProxyDistillationConfig)
class ForwardKLProxyDistillation(_DirichletCriterion):
    """Forward KL to the proxy: ``KL(Dir(beta0 pbar + target_offset) || Dir(alpha))``."""

    def token_loss(self, logits, stats, logit_scale=1.0):
        return losses.fkl_proxy_loss(
            logits,
            self.mean_probs(stats),
            self.proxy_precision(stats),
            self.cfg.target_offset,
            self.cfg.parametrization,
            self.cfg.model_offset,
            logit_scale,
        )


@register_criterion("sequence_distribution_distillation", dataclass=DirichletDistillationConfig)
class DirichletNLLDistillation(_DirichletCriterion):
    """EnD2: the Dirichlet NLL of the members' distributions, ``-(1/M) sum_m log Dir(p_m; alpha)``."""

    reads_mean_log_probs = True

    def token_loss(self, logits, stats, logit_scale=1.0):
        return losses.dirichlet_nll_loss(
            logits, stats.mean_log_probs, self.cfg.parametrization, self.cfg.model_offset, logit_scale
        )


@register_criterion("forward_kl_mean_distillation", dataclass=MeanDistillationConfig)
class MeanKLDistillation(_DistillationCriterion):
    """KD to the ensemble mean: ``KL(pbar || softmax(z))``."""

    def token_loss(self, logits, stats, logit_scale=1.0):
        return losses.mean_kd_loss(logits, self.mean_probs(stats), logit_scale)
