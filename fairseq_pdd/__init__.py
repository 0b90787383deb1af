"""fairseq_pdd: ensemble distribution distillation (PD-EnD2 and baselines) as a fairseq plugin.

Importing the package registers its criteria and tasks with fairseq and installs the weights-only
checkpoint allow-list; ``fairseq-train --user-dir $(fairseq-pdd-user-dir)`` does the import.
"""
__version__ = "0.1.0"

from fairseq_pdd import checkpoints

checkpoints.install()

from fairseq_pdd import criterions, models, tasks  # noqa: E402,F401  (registration)
