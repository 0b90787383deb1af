"""``--criterion bdistil_residual_kd``: train the newest member of a ``bdistil_*`` model (fairseq glue).

The math is in :mod:`fairseq_pdd.bdistil.boosting`. With the teacher's token distribution ``q`` (the
``distillation`` task's ensemble mean over ``--ensemble-paths``; one path for a single teacher) at
the N non-padding target positions, the frozen members 1..k-1 give the prefix errors
``e_s = KL(q || p_s)``, the weights ``w = exp(eta * sum_{s<k} min(e_s, c))`` (mean 1 per batch) and
the loss ``sum_t w_t [(1 - beta) KL(q_t || p_k,t) + beta NLL(y_t | p_k)]``. With ``--bdistil-prefix k``
(e.g. ``fairseq-validate --model-overrides``) member k is the one scored.

Logged per token: ``kl_teacher`` = KL(q || p_k) and ``kl_prefix`` = KL(q || p_{k-1}) (unweighted;
the acceptance rule needs ``kl_teacher <= kl_prefix``), their weighted versions, ``edge``
= 1 - weighted ratio (the acceptance rule needs ``edge >= gamma``), ``agreement`` of argmax p_k with
argmax q, ``nll_loss`` of the references under p_k, ``w_max``.
"""
import math
from dataclasses import dataclass, field

import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from fairseq_pdd.bdistil import boosting
from fairseq_pdd.criterions.distillation import STATS_KEY, NonFiniteError

SUMMED = ("kl_teacher", "kl_prefix", "wkl_teacher", "wkl_prefix", "agreement")


@dataclass
class BDistilCriterionConfig(FairseqDataclass):
    bdistil_eta: float = field(
        default=0.1, metadata={"help": "token weights exp(eta * sum of the earlier prefixes' clipped KL); 0: uniform"}
    )
    bdistil_err_clip: float = field(default=5.0, metadata={"help": "clip each prefix's per-token KL at c before weighting"})
    kd_gold_weight: float = field(
        default=0.0, metadata={"help": "beta: weight of the references' NLL beside the KL to the teacher"}
    )
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion("bdistil_residual_kd", dataclass=BDistilCriterionConfig)
class BDistilResidualKD(FairseqCriterion):
    """Member k learns what the product of members 1..k-1 still misses of the teacher."""

    needs_ensemble = True

    def __init__(self, task, cfg: BDistilCriterionConfig):
        super().__init__(task)
        if not 0.0 <= cfg.kd_gold_weight <= 1.0:
            raise ValueError(f"--kd-gold-weight must be in [0, 1], got {cfg.kd_gold_weight}")
        if cfg.bdistil_eta < 0.0 or cfg.bdistil_err_clip <= 0.0:
            raise ValueError("--bdistil-eta must be >= 0 and --bdistil-err-clip > 0")
        self.cfg = cfg

    def forward(self, model, sample, reduce=True):
        stats = sample.get(STATS_KEY)
        if stats is None:
            raise RuntimeError(
                "criterion 'bdistil_residual_kd' needs the teacher's statistics in each sample: "
                "train with --task distillation (or asr_distillation) and --ensemble-paths"
            )
        if not hasattr(model.decoder, "member_outputs"):
            raise TypeError(f"criterion 'bdistil_residual_kd' trains a bdistil_* model (--arch bdistil_transformer), not {type(model).__name__}")
        net_input = sample["net_input"]
        target = sample["target"]
        mask = target.ne(self.padding_idx)
        q = stats.mean_probs.clone()  # made under inference_mode; autograd must be able to save it
        encoder_out = model.encoder.forward_torchscript(net_input)
        combined = model.decoder.combiner()
        prefix_error = boosting.uniform_kl(q)
        clipped_sum = torch.zeros_like(prefix_error)
        outputs = model.decoder.member_outputs(net_input["prev_output_tokens"], encoder_out)
        for j, (logits, _) in enumerate(outputs, start=1):
            logits = logits[mask]
            if logits.shape != q.shape:
                raise ValueError(
                    f"member {j} gives {tuple(logits.shape)} (tokens x classes) but the teacher statistics "
                    f"are {tuple(q.shape)}: the members' and the teachers' target vocabularies differ"
                )
            combined.add(logits)
            log_probs = combined.log_probs()
            if j < model.decoder.prefix:
                with torch.no_grad():
                    prefix_error = boosting.kl_to_teacher(q, log_probs)
                    clipped_sum += prefix_error.clamp(max=self.cfg.bdistil_err_clip)
        weights = boosting.boosting_weights(clipped_sum, self.cfg.bdistil_eta)
        tgt = target[mask]
        loss = boosting.residual_kd_loss(log_probs, q, tgt, weights, self.cfg.kd_gold_weight).sum()
        if not torch.isfinite(loss.detach()).item():
            raise NonFiniteError(f"non-finite bdistil loss on sample ids {sample['id'].tolist()[:20]}")
        with torch.no_grad():
            error = boosting.kl_to_teacher(q, log_probs)
            nsentences = target.size(0)
            logging_output = {
                "loss": loss.data,
                "nll_loss": -log_probs.gather(-1, tgt.unsqueeze(-1)).sum().data,
                "kl_teacher": error.sum(),
                "kl_prefix": prefix_error.sum(),
                "wkl_teacher": (weights * error).sum(),
                "wkl_prefix": (weights * prefix_error).sum(),
                "agreement": log_probs.argmax(-1).eq(q.argmax(-1)).sum(),
                "w_max": weights.max() if weights.numel() else weights.new_zeros(()),
                "ntokens": sample["ntokens"],
                "nsentences": nsentences,
                "sample_size": nsentences if self.cfg.sentence_avg else sample["ntokens"],
            }
        return loss, logging_output["sample_size"], logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        sample_size, ntokens = total("sample_size"), total("ntokens")
        metrics.log_scalar("loss", total("loss") / sample_size / math.log(2), sample_size, round=4)
        metrics.log_scalar("nll_loss", total("nll_loss") / ntokens / math.log(2), ntokens, round=4)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        for key in SUMMED:
            metrics.log_scalar(key, total(key) / ntokens, ntokens, round=4)
        metrics.log_scalar("w_max", max(utils.item(log.get("w_max", 0)) for log in logging_outputs), round=3)
        metrics.log_derived(
            "edge",
            lambda meters: round(1.0 - meters["wkl_teacher"].avg / meters["wkl_prefix"].avg, 4)
            if meters["wkl_prefix"].avg > 0
            else 0.0,
        )

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return False
