from fairseq_pdd.tasks import distillation  # noqa: F401  (registers the tasks)
