"""fairseq_pdd: ensemble distribution distillation (PD-EnD2 and baselines) as a fairseq plugin.

``fairseq-train --user-dir $(fairseq-pdd-user-dir)`` imports this package after fairseq, which
registers its criteria, tasks and models, installs the weights-only checkpoint allow-list and has
fairseq's background batch threads stopped at exit (:func:`register`). Imported without fairseq (the
pure-torch math, the evaluation, the toy data), it does not import fairseq; a tool that drives
fairseq in-process calls :func:`register` itself.
"""
import sys

__version__ = "0.1.0"


def register() -> None:
    """Register the criteria and tasks with fairseq, install the checkpoint allow-list and the exit hook
    that stops fairseq's batch threads (:mod:`fairseq_pdd.clean_exit`) (idempotent)."""
    from fairseq_pdd import clean_exit
    from fairseq_pdd.teachers import checkpoints

    checkpoints.install()
    clean_exit.install()
    from fairseq_pdd import criterions, models, tasks  # noqa: F401  (registration on first import)


if "fairseq" in sys.modules:  # imported by fairseq's --user-dir (or after fairseq by a script)
    register()
