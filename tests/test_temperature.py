"""The teachers' temperature: the annealing schedule, and the tempered statistics against torch's softmax."""
import math

import pytest
import torch

from fairseq_pdd.distill.ensemble_stats import smooth_log_probs_
from fairseq_pdd.distill.temperature import AnnealingError, TemperatureSchedule
from fairseq_pdd.teachers.ensemble import TeacherEnsemble

V = 11


def test_schedule_is_linear_in_temperature_between_start_and_end():
    schedule = TemperatureSchedule(initial=10.0, start=4, end=13)
    expected = {0: 10.0, 4: 10.0, 5: 9.0, 7: 7.0, 12: 2.0, 13: 1.0, 100: 1.0}
    assert {u: schedule(u) for u in expected} == pytest.approx(expected)
    assert schedule.active


def test_schedule_can_warm_from_a_temperature_below_one():
    schedule = TemperatureSchedule(initial=0.5, start=0, end=2)
    assert [schedule(u) for u in range(4)] == pytest.approx([0.5, 0.75, 1.0, 1.0])


def test_default_schedule_is_off():
    schedule = TemperatureSchedule()
    assert not schedule.active and schedule(0) == schedule(10**6) == 1.0


@pytest.mark.parametrize("options,problem", [
    (dict(initial=0.0, start=0, end=10), "finite number > 0"),
    (dict(initial=float("inf"), start=0, end=10), "finite number > 0"),
    (dict(initial=-2.0, start=0, end=10), "finite number > 0"),
    (dict(initial=4.0, start=-1, end=10), "--anneal-start must be >= 0"),
    (dict(initial=4.0, start=5, end=5), "--anneal-end > --anneal-start"),
    (dict(initial=4.0, start=0, end=0), "--anneal-end > --anneal-start"),
])
def test_bad_schedules_are_refused(options, problem):
    with pytest.raises(AnnealingError, match=problem):
        TemperatureSchedule(**options)


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, **net_input):
        return (self.logits.clone(),)


@pytest.fixture
def members():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(2, 5, V, generator=g) * 4 for _ in range(3)]


MASK = torch.tensor([[True, True, True, True, False], [True, True, False, False, False]])
SAMPLE = {"net_input": {}, "id": torch.tensor([0, 1])}


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0, 10.0])
def test_tempered_statistics_are_those_of_softmax_of_logits_over_t(members, temperature):
    """Oracle: each member's softmax(z / T) from torch in float64, the statistics by their definitions."""
    ensemble = TeacherEnsemble([FixedLogits(z) for z in members], ["t"] * len(members), torch.float32)
    got = ensemble.statistics(SAMPLE, MASK, temperature)
    probs = torch.stack([torch.softmax(z[MASK].double() / temperature, -1) for z in members])
    log_probs = probs.log()
    pbar, mlog = probs.mean(0), log_probs.mean(0)
    expected = {
        "mean_probs": pbar,
        "mean_log_probs": mlog,
        "expected_entropy": -(probs * log_probs).sum(-1).mean(0),
        "entropy_of_expected": -(pbar * pbar.log()).sum(-1),
        "cross_entropy": -(pbar * mlog).sum(-1),
    }
    for name, value in expected.items():
        torch.testing.assert_close(getattr(got, name).double(), value, rtol=1e-5, atol=1e-5, msg=name)
    log_mean = ensemble.log_predictive(SAMPLE, MASK, temperature)
    torch.testing.assert_close(log_mean.double(), pbar.log(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature,eps", [(1.0, 1e-3), (3.0, 1e-3), (1.0, 0.2)])
def test_smoothed_statistics_are_those_of_the_smoothed_members(members, temperature, eps):
    """--teacher-smoothing: oracle (1 - eps) softmax(z_m / T) + eps / K per member in float64, then the
    statistics by their definitions; mlog is the mean of the smoothed members' logs."""
    ensemble = TeacherEnsemble([FixedLogits(z * 3) for z in members], ["t"] * len(members), torch.float32)
    got = ensemble.statistics(SAMPLE, MASK, temperature, eps)
    probs = torch.stack([torch.softmax(3 * z[MASK].double() / temperature, -1) for z in members])
    probs = (1 - eps) * probs + eps / V
    pbar, mlog = probs.mean(0), probs.log().mean(0)
    torch.testing.assert_close(got.mean_probs.double(), pbar, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.mean_log_probs.double(), mlog, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.expected_entropy.double(), -(probs * probs.log()).sum(-1).mean(0), rtol=1e-5, atol=1e-5)
    assert got.mean_log_probs.min() >= math.log(eps / V) - 1e-5
    log_mean = ensemble.log_predictive(SAMPLE, MASK, temperature, eps)
    torch.testing.assert_close(log_mean.double(), pbar.log(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps", [-0.1, 1.0, float("nan")])
def test_bad_teacher_smoothing_is_refused(eps):
    with pytest.raises(ValueError, match="must be in \\[0, 1\\)"):
        smooth_log_probs_(torch.zeros(2, V), eps)


def test_higher_temperature_softens_the_teachers(members):
    """T > 1 raises every member's entropy and lowers the ensemble's disagreement (MKL) here."""
    ensemble = TeacherEnsemble([FixedLogits(z) for z in members], ["t"] * len(members), torch.float32)
    cold, hot = (ensemble.statistics(SAMPLE, MASK, t) for t in (1.0, 4.0))
    assert (hot.expected_entropy > cold.expected_entropy).all()
    assert hot.mkl.sum() < cold.mkl.sum()


def test_teacher_logits_are_not_modified(members):
    """The temperature divides the masked copy of a member's logits, never the model's output tensor."""
    model = torch.nn.Module()
    outputs = [z.clone() for z in members]
    model.forward = lambda **_: (outputs[0],)
    TeacherEnsemble([model], ["t"], torch.float32).statistics(SAMPLE, MASK, 5.0)
    torch.testing.assert_close(outputs[0], members[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------ the student's temperature


class FixedStudent(torch.nn.Module):
    """A 'model' whose decoder output is fixed logits (B, T, V); targets from the sample."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, **net_input):
        return (self.logits, None)

    def get_targets(self, sample, net_output):
        return sample["target"]


@pytest.mark.parametrize("name", ["sequence_distribution_distillation", "dirichlet_proxy_distillation",
                                  "rkl_dirichlet_proxy_distillation", "forward_kl_mean_distillation"])
def test_tempered_student_is_the_student_with_logits_over_t(members, name):
    """With sample["student_temperature"] = T a criterion's loss and gradient are those of logits z / T."""
    from types import SimpleNamespace

    from fairseq.criterions import CRITERION_REGISTRY, CRITERION_DATACLASS_REGISTRY
    from fairseq_pdd.criterions.distillation import STATS_KEY, STUDENT_TEMPERATURE_KEY

    pad = 1
    task = SimpleNamespace(target_dictionary=SimpleNamespace(pad=lambda: pad))
    cfg = CRITERION_DATACLASS_REGISTRY[name](sentence_avg=False)
    criterion = CRITERION_REGISTRY[name](task, cfg)
    target = torch.where(MASK, torch.zeros(2, 5, dtype=torch.long) + 3, pad)
    stats = TeacherEnsemble([FixedLogits(z) for z in members], ["t"] * 3, torch.float32).statistics(SAMPLE, MASK)
    z = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(5)) * 2

    def loss_and_grad(logits, temperature):
        logits = logits.clone().requires_grad_()
        sample = {"target": target, "net_input": {}, "id": SAMPLE["id"], "ntokens": int(MASK.sum()), STATS_KEY: stats}
        if temperature is not None:
            sample[STUDENT_TEMPERATURE_KEY] = temperature
        loss, _, _ = criterion(FixedStudent(logits), sample)
        loss.backward()
        return loss.detach(), logits.grad

    tempered_loss, tempered_grad = loss_and_grad(z, 4.0)
    plain_loss, grad_wrt_scaled = loss_and_grad(z / 4.0, None)
    torch.testing.assert_close(tempered_loss, plain_loss)
    torch.testing.assert_close(tempered_grad, grad_wrt_scaled / 4.0)  # chain rule through z / T


# ----------------------------------------------- options of the from-scratch Dirichlet students (docs/criteria.md)


def _criterion_loss_and_grad(name, members, z, **options):
    """(loss, dL/dz) of criterion ``name`` with config ``options`` on the members' statistics, logits z (2, 5, V)."""
    from types import SimpleNamespace

    from fairseq.criterions import CRITERION_REGISTRY, CRITERION_DATACLASS_REGISTRY
    from fairseq_pdd.criterions.distillation import STATS_KEY

    pad = 1
    task = SimpleNamespace(target_dictionary=SimpleNamespace(pad=lambda: pad))
    criterion = CRITERION_REGISTRY[name](task, CRITERION_DATACLASS_REGISTRY[name](sentence_avg=False, **options))
    target = torch.where(MASK, torch.zeros(2, 5, dtype=torch.long) + 3, pad)
    stats = TeacherEnsemble([FixedLogits(m) for m in members], ["t"] * 3, torch.float32).statistics(SAMPLE, MASK)
    logits = z.clone().requires_grad_()
    sample = {"target": target, "net_input": {}, "id": SAMPLE["id"], "ntokens": int(MASK.sum()), STATS_KEY: stats}
    loss, _, logging_output = criterion(FixedStudent(logits), sample)
    loss.backward()
    return loss.detach(), logits.grad, stats, logging_output


@pytest.mark.parametrize("name", ["sequence_distribution_distillation", "dirichlet_proxy_distillation",
                                  "rkl_dirichlet_proxy_distillation"])
def test_divide_by_precision_weights_each_token_by_one_over_a0(members, name):
    """--divide-by-precision: loss sum_t L_t / a0_t and gradient dL_t/dz / a0_t, a0 = sum_k (exp(z_k) + 1) detached
    (oracle: the plain criterion's per-token gradient, rows scaled by 1 / a0 computed here)."""
    z = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(5)) * 2
    plain_loss, plain_grad, _, _ = _criterion_loss_and_grad(name, members, z, model_offset=1.0)
    loss, grad, _, _ = _criterion_loss_and_grad(name, members, z, model_offset=1.0, divide_by_precision=True)
    a0 = (z.double().exp() + 1.0).sum(-1)
    torch.testing.assert_close(grad.double(), plain_grad.double() / a0.unsqueeze(-1), rtol=1e-5, atol=1e-9)
    assert loss.abs() < plain_loss.abs()


@pytest.mark.parametrize("name, offset", [("sequence_distribution_distillation", 1.0),
                                          ("dirichlet_proxy_distillation", 1.0),
                                          ("rkl_dirichlet_proxy_distillation", 0.0)])
def test_default_model_offsets(name, offset):
    """PD-EnD2's Dirichlet offset defaults to 0 (with 1 its students loop at K = 3352, docs/errors.md); EnD2 and the
    forward KL to the proxy keep 1 (with 0 the flat Dirichlet is their optimum, docs/criteria.md)."""
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY

    import fairseq_pdd  # noqa: F401  (registers the criteria)

    assert CRITERION_DATACLASS_REGISTRY[name]().model_offset == offset


@pytest.mark.parametrize("name", ["dirichlet_proxy_distillation", "rkl_dirichlet_proxy_distillation"])
def test_max_target_precision_is_the_loss_of_the_capped_proxy(members, name):
    """--max-target-precision C: the criterion's loss is the kernel's with min(beta0, C) (logged too)."""
    from fairseq_pdd.distill import losses
    from fairseq_pdd.distill.dirichlet import proxy_precision

    z = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(5)) * 2
    _, _, stats, _ = _criterion_loss_and_grad(name, members, z)
    uncapped = proxy_precision(stats.mkl, stats.epkl, V)
    cap = float(uncapped.median())
    loss, _, stats, logging_output = _criterion_loss_and_grad(name, members, z, max_target_precision=cap)
    beta0 = uncapped.clamp(max=cap)
    assert (uncapped > cap).any()
    if name == "dirichlet_proxy_distillation":
        expected = losses.fkl_proxy_loss(z[MASK], stats.mean_probs, beta0, 1.0, "exp", 1.0)[0].sum()
    else:
        expected = losses.rkl_proxy_loss(z[MASK], stats.mean_probs, beta0 + V, "exp", 0.0)[0].sum()  # its offset 0
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logging_output["ensemble_precision"], beta0.sum())
