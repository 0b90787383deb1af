"""The distillation temperature as a function of the update number (pure Python).

Each teacher's distribution is softened as ``p_m(T) = softmax(z_m / T)`` before the ensemble's
statistics are accumulated (and, with ``--temper-student``, the student's logits are divided by the
same T); the schedule anneals ``T`` linearly from ``T0`` to 1::

    T(u) = T0                                          u <= start
    T(u) = T0 + (1 - T0) (u - start) / (end - start)   start < u < end
    T(u) = 1                                           u >= end

``u`` is the number of updates already made (fairseq's ``update_num``: 0 for the first update), so
the temperature is a function of the checkpoint's ``num_updates`` alone and a resumed run continues
the schedule exactly.

Why linear in T: it is the schedule of the EnD2 fairseq code that defined ``--anneal-start`` /
``--anneal-end`` (its task's ``update_step``), the options the PD-EnD2 authors' commands pass, so
their commands mean here what they meant there; and it keeps the targets soft for longest (from
``T0 = 10`` the temperature stays above 2 for 8/9 of the window), which is what the Dirichlet
students need: they learn the ensemble's shape at high T and collapse when T falls below about 3
before they have (measured on the demo task: a schedule linear in ``1/T``, which reaches T = 2.5
after a quarter of the window, collapsed; docs, "Temperature annealing").
"""
import math
from dataclasses import dataclass


class AnnealingError(ValueError):
    """Annealing options that define no schedule."""


@dataclass(frozen=True)
class TemperatureSchedule:
    initial: float = 1.0  #: T0, the temperature up to ``start``
    start: int = 0  #: the update at which annealing begins
    end: int = 0  #: the first update at T = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.initial) and self.initial > 0):
            raise AnnealingError(f"the initial temperature (--init-temp) must be a finite number > 0, got {self.initial}")
        if self.start < 0:
            raise AnnealingError(f"--anneal-start must be >= 0, got {self.start}")
        if self.active and self.end <= self.start:
            raise AnnealingError(
                f"annealing from T0={self.initial} needs --anneal-end > --anneal-start, got "
                f"--anneal-start {self.start} --anneal-end {self.end}"
            )

    @property
    def active(self) -> bool:
        """Whether any update sees a temperature other than 1."""
        return self.initial != 1.0

    def __call__(self, num_updates: int) -> float:
        """T after ``num_updates`` updates (module docstring)."""
        if not self.active or num_updates >= self.end:
            return 1.0
        if num_updates <= self.start:
            return self.initial
        progress = (num_updates - self.start) / (self.end - self.start)
        return self.initial + (1.0 - self.initial) * progress
