"""The distillation math, pure torch (no fairseq import).

* :mod:`.dirichlet`       the student's Dirichlet parametrization and the proxy precision;
* :mod:`.ensemble_stats`  the ensemble's statistics accumulated member by member, reusable buffers;
* :mod:`.fused`           a chunked per-token loss whose gradient is computed in the forward pass;
* :mod:`.losses`          the four ensemble-distillation losses with closed-form gradients;
* :mod:`.topk_stats`      top-k compression of the statistics (the teacher cache) and the dense rebuild.
"""
