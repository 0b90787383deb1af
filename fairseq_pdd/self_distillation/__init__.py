"""Self-distillation with ground-truth mixing (Borup & Andersen, 2021) at token level.

* :mod:`.loss`                the mixed-target loss ``CE(a onehot(y) + (1 - a) q, softmax(z))`` (pure torch);
* :mod:`.gt_weight`           choosing ``a`` from two students (pure math);
* :mod:`.kernel_ridge`        the kernel-ridge closed forms behind the method (numpy);
* :mod:`.estimate_gt_weight`  ``fairseq-pdd-estimate-gt-weight``: score a held-out subset, choose ``a``;
* :mod:`.chain_report`        ``fairseq-pdd-chain-report``: the per-step table of a chain (no fairseq).
"""
