"""The distillation math, pure torch (no fairseq import).

* :mod:`.dirichlet`       the student's Dirichlet parametrization and the proxy precision;
* :mod:`.ensemble_stats`  the ensemble's statistics accumulated member by member, reusable buffers;
* :mod:`.fused`           a chunked per-token loss whose gradient is computed in the forward pass;
* :mod:`.losses`          the four ensemble-distillation losses with closed-form gradients;
* :mod:`.temperature`     the annealed distillation temperature as a function of the update;
* :mod:`.topk_stats`      top-k compression of the statistics (the teacher cache) and the dense rebuild;
* :mod:`.backend`         which implementation runs: the torch reference or the Triton kernels
  (``FAIRSEQ_PDD_KERNELS=auto|torch|triton``);
* :mod:`.special`         digamma, trigamma, lgamma as Triton device functions (float32);
* :mod:`.triton_losses`   the four losses as one Triton kernel (value, log-normaliser, gradient per row);
* :mod:`.triton_stats`    the ensemble statistics' accumulation as Triton kernels.

The Triton modules import ``triton`` and are imported only when the backend chooses them; the
decoding side's kernel is :mod:`fairseq_pdd.decoding.triton_measures`.
"""
