"""Progressive ensemble distillation (B-DISTIL, Dennis et al. 2023) adapted to token-level models.

* :mod:`.boosting`  product of experts, error weights, the edge and acceptance rule (pure torch);
* :mod:`.cli`       ``fairseq-pdd-bdistil``: accept / assemble / params / metrics.

The fairseq registrations are :mod:`fairseq_pdd.models.bdistil` and :mod:`fairseq_pdd.criterions.bdistil`.
"""
