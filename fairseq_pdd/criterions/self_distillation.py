"""``--criterion gt_mixed_self_distillation``: self-distillation with ground-truth mixing (fairseq glue).

Trains the student against ``a * onehot(y) + (1 - a) * q`` (see :mod:`fairseq_pdd.self_distillation.loss`
for the loss, its gradient and the options), where ``q`` is the frozen previous-generation model:
run it with ``--task distillation --ensemble-paths PREVIOUS.pt`` (speech: ``--task asr_distillation``;
any task with the teacher mixin), which loads the teacher weights-only, checks its dictionaries, and attaches
its log-probabilities at the target positions as ``sample["teacher_log_probs"]``. Several checkpoints
act as one teacher, their mean distribution.

The criterion only reads ``net_input``, the decoder's logits and ``target``, so it is the same for
translation and speech recognition.

Logged: ``loss`` (bits per sample_size, as fairseq), ``nll_loss``/``ppl`` on the references (bits,
unsmoothed, comparable with fairseq's cross-entropy runs), and per token in nats ``distill_ce``
(``CE(q, p)``), ``distill_kl`` (``KL(q || p)``), ``student_entropy``, ``teacher_entropy``, and
``gt_weight`` (``a``).
"""
import math
from dataclasses import dataclass, field

import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from fairseq_pdd.criterions.distillation import NonFiniteError
from fairseq_pdd.self_distillation.loss import DIAGNOSTICS, LOSSES, check_options, mixed_target_loss

TEACHER_LOG_PROBS_KEY = "teacher_log_probs"
#: Logged names of the diagnostics columns (nats per token), in the order of ``DIAGNOSTICS``.
LOG_NAMES = dict(zip(DIAGNOSTICS, ("nll_loss", "distill_ce", "distill_kl", "student_entropy", "teacher_entropy")))


@dataclass
class GtMixedSelfDistillationConfig(FairseqDataclass):
    gt_weight: float = field(
        default=0.5,
        metadata={"help": "a, the weight of the ground truth in the target a * onehot(y) + (1 - a) * teacher: "
                          "1 = plain supervised training, 0 = pure self-distillation"},
    )
    sd_loss: ChoiceEnum(LOSSES) = field(
        default="ce", metadata={"help": "ce: cross-entropy to the mixed target; brier: squared error of softmax"}
    )
    sd_temperature: float = field(
        default=1.0, metadata={"help": "temperature of the teacher's target softmax(log q / T); the student stays at 1"}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "smooth the ground truth: (1 - eps) onehot(y) + eps / V"}
    )
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion("gt_mixed_self_distillation", dataclass=GtMixedSelfDistillationConfig)
class GtMixedSelfDistillation(FairseqCriterion):
    """Token-level self-distillation with ground-truth mixing (Borup & Andersen, 2021)."""

    #: The task must load the previous generation (it refuses to run without --ensemble-paths) ...
    needs_ensemble = True
    #: ... and attach only its log-probabilities, not the ensemble statistics.
    teacher_log_predictive = True

    def __init__(self, task, cfg: GtMixedSelfDistillationConfig):
        super().__init__(task)
        check_options(cfg.gt_weight, cfg.label_smoothing, cfg.sd_temperature, str(cfg.sd_loss))
        self.cfg = cfg
        self.sentence_avg = cfg.sentence_avg

    def forward(self, model, sample, reduce=True):
        teacher_log_probs = sample.get(TEACHER_LOG_PROBS_KEY)
        if teacher_log_probs is None:
            raise RuntimeError(
                "criterion 'gt_mixed_self_distillation' needs the previous generation's outputs in each "
                "sample: train with --task distillation (speech: --task asr_distillation) and "
                "--ensemble-paths PREVIOUS_CHECKPOINT"
            )
        net_output = model(**sample["net_input"])
        target = model.get_targets(sample, net_output)
        mask = target.ne(self.padding_idx)
        logits = net_output[0][mask]
        if logits.shape != teacher_log_probs.shape:
            raise ValueError(
                f"student output {tuple(logits.shape)} (tokens x classes) does not match the teacher's "
                f"{tuple(teacher_log_probs.shape)}: the student's and the teacher's target vocabularies differ"
            )
        per_token, _, diagnostics = mixed_target_loss(
            logits, teacher_log_probs, target[mask], self.cfg.gt_weight,
            self.cfg.label_smoothing, self.cfg.sd_temperature, str(self.cfg.sd_loss),
        )
        loss = per_token.sum()
        if not torch.isfinite(loss.detach()).item():
            raise NonFiniteError(
                f"non-finite self-distillation loss (student logits finite: "
                f"{bool(torch.isfinite(logits).all())}) on sample ids {sample['id'].tolist()[:20]}"
            )
        nsentences = sample["target"].size(0)
        sums = diagnostics.sum(0)
        logging_output = {
            "loss": loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": nsentences,
            "sample_size": nsentences if self.sentence_avg else sample["ntokens"],
            "gt_weight": self.cfg.gt_weight * sample["ntokens"],
            **{LOG_NAMES[name]: sums[i] for i, name in enumerate(DIAGNOSTICS)},
        }
        return loss, logging_output["sample_size"], logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        sample_size, ntokens = total("sample_size"), total("ntokens")
        metrics.log_scalar("loss", total("loss") / sample_size / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", total("nll_loss") / ntokens / math.log(2), ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        for key in ("distill_ce", "distill_kl", "student_entropy", "teacher_entropy", "gt_weight"):
            metrics.log_scalar(key, total(key) / ntokens, ntokens, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
