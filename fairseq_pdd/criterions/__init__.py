from fairseq_pdd.criterions import distillation  # noqa: F401  (registers the criteria)
