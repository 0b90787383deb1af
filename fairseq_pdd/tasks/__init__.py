from fairseq_pdd.tasks import asr_distillation, distillation  # noqa: F401  (registers the tasks)
