"""Teacher-ensemble options and per-step statistics, shared by the MT and ASR distillation tasks.

A task that mixes this in loads ``--ensemble-paths`` when it builds a criterion that needs them
(so ``fairseq-generate`` on a student never touches the teachers), and before every train and valid
step attaches, at the sample's non-padding target positions, what the criterion reads: the
ensemble's statistics as ``sample["ensemble_stats"]``, or, for a criterion with
``teacher_log_predictive = True`` (self-distillation), only the log of the teachers' mean
distribution as ``sample["teacher_log_probs"]`` (one (N, V) buffer).

With ``--teacher-cache DIR`` no teacher is loaded: every loaded subset is wrapped by
:mod:`fairseq_pdd.teachers.cache_dataset` (refused if ``DIR/{subset}`` was built for other data, dictionaries
or, when ``--ensemble-paths`` names them, other teachers), and the statistics are rebuilt on the
step's device from the cached top-k (:func:`fairseq_pdd.distill.topk_stats.expand`), so the criteria run
unchanged (a self-distillation criterion gets the log of the rebuilt mean).

Temperature annealing (``--init-temp T0 --anneal-start S --anneal-end E``, off by default): in
training each teacher's distribution is ``softmax(z_m / T(u))`` before the streamed accumulation,
with ``T`` annealed from ``T0`` to 1 over updates S..E (:mod:`fairseq_pdd.distill.temperature`; ``u`` =
fairseq's ``update_num``, so resuming from a checkpoint continues the schedule). It applies to every
criterion that reads the teachers (their statistics or their mean); with ``--temper-student`` the
ensemble-distillation criteria also divide the student's logits by T (``sample["student_temperature"]``,
training only). Validation always uses ``T = 1``:
the valid loss then measures the student against the real targets, comparable across updates and
runs, and ``checkpoint_best`` is chosen on it. The training logs carry ``teacher_temperature`` (the
token-weighted mean of T over the logged updates). A teacher cache stores only ``T = 1`` statistics
of the ensemble mean (the members' tempered distributions, whose mean and disagreement are not
functions of the cached ones, are gone), so annealing with ``--teacher-cache`` is refused.

``--teacher-smoothing eps`` (off by default) smooths each teacher's tempered distribution towards
uniform, ``(1 - eps) p_m + eps / K``, before the accumulation, in training and validation
(:func:`fairseq_pdd.distill.ensemble_stats.smooth_log_probs_`); refused with ``--teacher-cache`` for the
same reason.
"""
import logging
from dataclasses import dataclass, field

import torch
from fairseq import utils
from fairseq.logging import metrics

from fairseq_pdd.teachers import cache_dataset
from fairseq_pdd.teachers.cache_format import teacher_fingerprint
from fairseq_pdd.criterions.distillation import STATS_KEY, STUDENT_TEMPERATURE_KEY
from fairseq_pdd.criterions.self_distillation import TEACHER_LOG_PROBS_KEY
from fairseq_pdd.teachers.ensemble import TeacherEnsemble, TeacherError, split_paths
from fairseq_pdd.distill.temperature import AnnealingError, TemperatureSchedule
from fairseq_pdd.distill.topk_stats import expand

logger = logging.getLogger(__name__)


@dataclass
class TeacherEnsembleConfig:
    ensemble_paths: str = field(
        default="",
        metadata={"help": "teacher checkpoints, colon- or comma-separated (a.pt:b.pt or a.pt,b.pt); "
                  "with --teacher-cache only hashed, to check that the cache comes from them"},
    )
    fp16_ensemble: bool = field(default=False, metadata={"help": "run the teachers in float16"})
    bf16_ensemble: bool = field(default=False, metadata={"help": "run the teachers in bfloat16"})
    teacher_cache: str = field(
        default="",
        metadata={"help": "train from the offline teacher cache in this directory (one folder per "
                  "subset, built by python -m fairseq_pdd.teachers.build_cache); no teacher is loaded"},
    )
    teacher_cache_skip_checksums: bool = field(
        default=False, metadata={"help": "check only the sizes of the cache's arrays, not their sha256"}
    )
    init_temp: float = field(
        default=1.0,
        metadata={"help": "teacher temperature T0 at the start of training: teachers give softmax(z / T), T "
                  "annealed linearly from T0 to 1 between --anneal-start and --anneal-end (1: no annealing)"},
    )
    anneal_start: int = field(default=0, metadata={"help": "last update at the initial teacher temperature"})
    anneal_end: int = field(default=0, metadata={"help": "first update at teacher temperature 1"})
    teacher_smoothing: float = field(
        default=0.0,
        metadata={"help": "smooth each teacher's distribution towards uniform, (1 - eps) p_m + eps / K, before "
                  "the ensemble's statistics (train and valid; the EnD2 reference code's teacher_prob_smoothing; "
                  "refused with --teacher-cache)"},
    )
    temper_student: bool = field(
        default=False,
        metadata={"help": "in training also divide the student's logits by the annealed T (both sides tempered, "
                  "as in the EnD2 reference code's alpha = exp(z / T)); the ensemble-distillation criteria only"},
    )


TEMPERATURE_LOG = "teacher_temperature"


class TeacherEnsembleMixin:
    """Mixed into a FairseqTask whose options (``cfg``, or ``args`` for a legacy task such as
    ``speech_to_text``) carry :class:`TeacherEnsembleConfig`'s fields."""

    teachers = None
    _temperature_schedule = None

    def temperature_schedule(self) -> TemperatureSchedule:
        """The teachers' temperature schedule of the options (checked on the first call)."""
        if self._temperature_schedule is None:
            options = self.teacher_options
            schedule = TemperatureSchedule(options.init_temp, options.anneal_start, options.anneal_end)
            if schedule.active and options.teacher_cache:
                raise AnnealingError(
                    f"--init-temp {options.init_temp} anneals the teachers' temperature, but --teacher-cache "
                    "holds only their T = 1 statistics (the mean of the members' tempered distributions "
                    "and their disagreement cannot be recovered from it): train with the teachers online "
                    "(--ensemble-paths, no --teacher-cache) or without annealing (--init-temp 1)"
                )
            self._temperature_schedule = schedule
        return self._temperature_schedule

    def teacher_smoothing(self) -> float:
        """``--teacher-smoothing``, checked: in [0, 1), and 0 with a teacher cache (which holds only the
        unsmoothed ensemble mean's top-k, not the members' distributions that are smoothed)."""
        eps = self.teacher_options.teacher_smoothing
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"--teacher-smoothing must be in [0, 1), got {eps}")
        if eps and self.teacher_options.teacher_cache:
            raise ValueError(
                f"--teacher-smoothing {eps} smooths each teacher's distribution, but --teacher-cache holds only "
                "the ensemble mean's top-k: train with the teachers online (--ensemble-paths) or without it"
            )
        return eps

    @property
    def teacher_options(self):
        return self.cfg if getattr(self, "cfg", None) is not None else self.args

    def teacher_dtype(self) -> torch.dtype:
        if self.teacher_options.fp16_ensemble and self.teacher_options.bf16_ensemble:
            raise ValueError("--fp16-ensemble and --bf16-ensemble are exclusive")
        if self.teacher_options.fp16_ensemble:
            return torch.float16
        return torch.bfloat16 if self.teacher_options.bf16_ensemble else torch.float32

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        if not self.teacher_options.teacher_cache:
            return
        self.temperature_schedule()  # refuse annealing and smoothing before the cache is opened
        self.teacher_smoothing()
        if not hasattr(self, "_teacher_caches"):
            self._teacher_caches = {}
            self._teacher_fingerprint = teacher_fingerprint(split_paths(self.teacher_options.ensemble_paths))
        wrapped = cache_dataset.wrap(
            self.datasets[split],
            self.teacher_options.teacher_cache,
            split,
            self,
            self._teacher_fingerprint,
            not self.teacher_options.teacher_cache_skip_checksums,
            self._teacher_caches.get(split),
        )
        if split not in self._teacher_caches:
            header = wrapped.cache.header
            logger.info(
                "subset %s: teacher cache %s (%d teachers %s, k=%d, %s, remaining mass mean %.3g)",
                split, wrapped.cache.directory, header["num_models"],
                [t["path"] for t in header["teachers"]], header["k"], header["dtype"], header["rest_mass"]["mean"],
            )
        self._teacher_caches[split] = wrapped.cache
        self.datasets[split] = wrapped

    def build_criterion(self, cfg, *args, **kwargs):
        criterion = super().build_criterion(cfg, *args, **kwargs)
        options = self.teacher_options
        if getattr(criterion, "needs_ensemble", False):
            self.temperature_schedule()  # refuses bad annealing options before any teacher is loaded
            self.teacher_smoothing()
            if options.temper_student and not getattr(criterion, "reads_student_temperature", False):
                raise AnnealingError(f"--temper-student: criterion '{cfg._name}' does not temper the student's logits")
        if getattr(criterion, "needs_ensemble", False) and self.teachers is None and not options.teacher_cache:
            paths = split_paths(self.teacher_options.ensemble_paths)
            if not paths:
                raise TeacherError(
                    f"criterion '{cfg._name}' distils an ensemble but --ensemble-paths is empty (and no --teacher-cache)"
                )
            self.teachers = TeacherEnsemble.load(paths, self, self.teacher_dtype())
        return criterion

    def attach_ensemble_statistics(self, sample, criterion, temperature: float = 1.0) -> None:
        """What ``criterion`` reads of the teachers, at ``temperature`` (a teacher cache is at T = 1:
        :meth:`temperature_schedule` refuses annealing with one)."""
        if not getattr(criterion, "needs_ensemble", False):
            return
        target = sample["target"]
        mask = target.ne(self.target_dictionary.pad())
        log_predictive = getattr(criterion, "teacher_log_predictive", False)
        topk = sample.get(cache_dataset.TOPK_KEY)
        if topk is not None:
            topk = topk.to(target.device, non_blocking=True)
            reads_log_probs = getattr(criterion, "reads_mean_log_probs", False)
            stats = expand(topk, len(self.target_dictionary), reads_log_probs)
            if log_predictive:
                sample[TEACHER_LOG_PROBS_KEY] = stats.mean_probs.log()
            else:
                sample[STATS_KEY] = stats
        elif self.teachers is not None:
            smoothing = self.teacher_smoothing()
            if log_predictive:
                sample[TEACHER_LOG_PROBS_KEY] = self.teachers.log_predictive(sample, mask, temperature, smoothing)
            else:
                sample[STATS_KEY] = self.teachers.statistics(sample, mask, temperature, smoothing)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs):
        schedule = self.temperature_schedule()
        anneal = getattr(criterion, "needs_ensemble", False) and schedule.active
        temperature = schedule(update_num) if anneal else 1.0
        self.attach_ensemble_statistics(sample, criterion, temperature)
        if anneal and self.teacher_options.temper_student:
            sample[STUDENT_TEMPERATURE_KEY] = temperature
        loss, sample_size, logging_output = super().train_step(
            sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs
        )
        if anneal:
            logging_output[TEMPERATURE_LOG] = temperature * logging_output["ntokens"]
        return loss, sample_size, logging_output

    def valid_step(self, sample, model, criterion):
        self.attach_ensemble_statistics(sample, criterion)
        return super().valid_step(sample, model, criterion)

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if any(TEMPERATURE_LOG in log for log in logging_outputs):
            ntokens = utils.item(sum(log.get("ntokens", 0) for log in logging_outputs))
            total = utils.item(sum(log.get(TEMPERATURE_LOG, 0) for log in logging_outputs))
            metrics.log_scalar(TEMPERATURE_LOG, total / ntokens if ntokens else 1.0, ntokens, round=4)
