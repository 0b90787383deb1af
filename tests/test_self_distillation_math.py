"""Self-distillation with ground-truth mixing: the loss, the choice of a and the kernel-ridge theory (no fairseq runs)."""
import json

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import rbf_kernel
from torch.distributions import Categorical, kl_divergence

from fairseq_pdd.self_distillation import chain_report
from fairseq_pdd.distill import fused
from fairseq_pdd.self_distillation import gt_weight, kernel_ridge
from fairseq_pdd.self_distillation.loss import DIAGNOSTICS, mixed_target_loss
from fairseq_pdd.teachers.ensemble import TeacherEnsemble, TeacherError
from fairseq_pdd.data.toy_mt import write_corpus

N, V = 9, 13


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)
    target = torch.randint(0, V, (N,), generator=g)
    return z, teacher, target


def mixed_target(teacher, target, a, eps, tau):
    q = torch.softmax(teacher / tau, -1)
    e = torch.nn.functional.one_hot(target, V).to(q) * (1 - eps) + eps / V
    return a * e + (1 - a) * q, q, e


# ------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("eps,tau", [(0.0, 1.0), (0.1, 2.0), (0.0, 0.5)])
def test_mixed_target_ce_is_weighted_nll_plus_teacher_ce(batch, a, eps, tau):
    """CE to a*e(y) + (1-a)*q equals a*NLL_eps + (1-a)*CE(q, p), with torch.distributions as the oracle."""
    z, teacher, target = batch
    loss, log_norm, diag = mixed_target_loss(z, teacher, target, a, eps, tau)
    student = Categorical(logits=z)
    q = Categorical(logits=teacher / tau)
    nll = -student.log_prob(target)
    teacher_ce = q.entropy() + kl_divergence(q, student)
    uniform_ce = -torch.log_softmax(z, -1).mean(-1)
    expected = a * ((1 - eps) * nll + eps * uniform_ce) + (1 - a) * teacher_ce
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(log_norm, torch.logsumexp(z, -1))
    oracle = {
        "nll": nll, "teacher_ce": teacher_ce, "teacher_kl": kl_divergence(q, student),
        "student_entropy": student.entropy(), "teacher_entropy": q.entropy(),
    }
    for i, name in enumerate(DIAGNOSTICS):
        torch.testing.assert_close(diag[:, i], oracle[name], msg=name)


@pytest.mark.parametrize("loss", ["ce", "brier"])
@pytest.mark.parametrize("a,eps,tau", [(0.0, 0.0, 1.0), (0.4, 0.1, 2.0), (1.0, 0.2, 0.7)])
def test_gradient(batch, loss, a, eps, tau):
    z, teacher, target = batch
    z = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: mixed_target_loss(x, teacher, target, a, eps, tau, loss)[0], (z,))
    if loss == "ce":  # dL/dz = p - m
        mixed_target_loss(z, teacher, target, a, eps, tau)[0].sum().backward()
        m, _, _ = mixed_target(teacher, target, a, eps, tau)
        torch.testing.assert_close(z.grad, torch.softmax(z.detach(), -1) - m)


@pytest.mark.parametrize("a", [0.0, 0.35, 1.0])
def test_brier_loss(batch, a):
    """||p - m||^2, which also equals a||p-e||^2 + (1-a)||p-q||^2 - a(1-a)||e-q||^2."""
    z, teacher, target = batch
    loss, _, _ = mixed_target_loss(z, teacher, target, a, 0.1, 1.5, "brier")
    m, q, e = mixed_target(teacher, target, a, 0.1, 1.5)
    p = torch.softmax(z, -1)
    torch.testing.assert_close(loss, (p - m).square().sum(-1))
    split = a * (p - e).square().sum(-1) + (1 - a) * (p - q).square().sum(-1) - a * (1 - a) * (e - q).square().sum(-1)
    torch.testing.assert_close(loss, split)


def test_chunks_keep_targets_aligned(batch, monkeypatch):
    """Chunks of 2 rows give the same values and gradients as one chunk."""
    z, teacher, target = batch
    results = []
    for chunk in (fused.CHUNK_ELEMENTS, 2 * V):
        monkeypatch.setattr(fused, "CHUNK_ELEMENTS", chunk)
        x = z.clone().requires_grad_(True)
        loss, _, diag = mixed_target_loss(x, teacher, target, 0.3, 0.1, 2.0, "brier")
        (loss * torch.arange(N)).sum().backward()
        results.append((loss.detach(), diag, x.grad))
    for one, chunked in zip(*results):
        torch.testing.assert_close(one, chunked)


def test_half_precision_logits_are_upcast(batch):
    z, teacher, target = batch
    loss, _, diag = mixed_target_loss(z.half(), teacher.float(), target, 0.5)
    assert loss.dtype == diag.dtype == torch.float32
    torch.testing.assert_close(loss, mixed_target_loss(z.half().float(), teacher.float(), target, 0.5)[0])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"gt_weight": 1.5}, "--gt-weight"),
        ({"gt_weight": 0.5, "temperature": 0.0}, "--sd-temperature"),
        ({"gt_weight": 0.5, "label_smoothing": 1.0}, "--label-smoothing"),
        ({"gt_weight": 0.5, "loss": "mse"}, "--sd-loss"),
    ],
)
def test_bad_options(batch, kwargs, message):
    z, teacher, target = batch
    with pytest.raises(ValueError, match=message):
        mixed_target_loss(z, teacher, target, **kwargs)


def test_bad_shapes(batch):
    z, teacher, target = batch
    with pytest.raises(ValueError, match="teacher log-probabilities"):
        mixed_target_loss(z, teacher[:, :-1], target, 0.5)
    with pytest.raises(ValueError, match="target"):
        mixed_target_loss(z, teacher, target[:-1], 0.5)


# ------------------------------------------------------------------------------ the teacher's predictive


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, **net_input):
        return (self.logits,)


def test_teacher_log_predictive_is_log_of_mean_distribution():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(2, 4, V, generator=g) * 3 for _ in range(3)]
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    sample = {"net_input": {}, "id": torch.tensor([5, 6])}
    for members in (logits[:1], logits):
        got = TeacherEnsemble([FixedLogits(x) for x in members], ["t"] * len(members), torch.float32).log_predictive(sample, mask)
        expected = torch.stack([torch.softmax(x[mask], -1) for x in members]).mean(0).log()
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("method", ["log_predictive", "statistics"])
def test_teachers_refuse_non_finite_outputs(method):
    bad = torch.zeros(1, 2, V)
    bad[0, 1, 3] = float("nan")
    ensemble = TeacherEnsemble([FixedLogits(torch.zeros(1, 2, V)), FixedLogits(bad)], ["good.pt", "bad.pt"], torch.float32)
    with pytest.raises(TeacherError, match=r"from bad\.pt on sample ids \[7\]"):
        getattr(ensemble, method)({"net_input": {}, "id": torch.tensor([7])}, torch.ones(1, 2, dtype=torch.bool))


# ------------------------------------------------------------------------------------- choosing a


def grid_argmin(objective, points=2001, refine=True):
    """Argmin of a vectorised ``objective(a (G,)) -> (G,)`` on a grid over [0, 1], refined once around the best point."""
    grid = np.linspace(0.0, 1.0, points)
    best = grid[int(np.argmin(objective(grid)))]
    if not refine:
        return best
    fine = np.clip(np.linspace(best - 1.0 / points, best + 1.0 / points, points), 0.0, 1.0)
    return fine[int(np.argmin(objective(fine)))]


def test_nll_optimal_weight_matches_grid_search():
    rng = np.random.default_rng(0)
    lp0 = np.log(rng.uniform(0.01, 1, 500))
    lp1 = np.log(rng.uniform(0.01, 1, 500))
    est = gt_weight.nll_optimal_weight(lp0, lp1)

    def nll(a):
        a = np.asarray(a)[..., None]
        return -np.mean(np.log(a * np.exp(lp1) + (1 - a) * np.exp(lp0)), -1)

    assert 0.0 < est.gt_weight < 1.0
    assert est.gt_weight == pytest.approx(grid_argmin(nll), abs=2e-6)
    assert est.objective == pytest.approx(float(nll(est.gt_weight)), rel=1e-12)
    assert (est.objective_a0, est.objective_a1) == pytest.approx((-lp0.mean(), -lp1.mean()))
    assert est.objective <= min(est.objective_a0, est.objective_a1)


def test_nll_optimal_weight_at_the_boundaries():
    better, worse = np.log([0.9, 0.8, 0.7]), np.log([0.5, 0.4, 1e-30])
    assert gt_weight.nll_optimal_weight(worse, better).gt_weight == 1.0
    assert gt_weight.nll_optimal_weight(better, worse).gt_weight == 0.0
    assert gt_weight.nll_optimal_weight(better, better).gt_weight == 1.0  # flat: supervised
    with pytest.raises(ValueError, match="different numbers of tokens"):
        gt_weight.nll_optimal_weight(better, better[:2])
    with pytest.raises(ValueError, match="<= 0"):
        gt_weight.nll_optimal_weight(-better, better)


def test_brier_statistics_match_grid_search():
    g = torch.Generator().manual_seed(2)
    p0, p1 = (torch.softmax(torch.randn(40, V, generator=g, dtype=torch.float64) * 2, -1) for _ in range(2))
    target = torch.randint(0, V, (40,), generator=g)
    stats = gt_weight.BrierStatistics()
    for rows in (slice(0, 15), slice(15, 40)):  # streamed in two batches
        stats.add(p0[rows], p1[rows], target[rows])
    est = stats.estimate()
    onehot = torch.nn.functional.one_hot(target, V).double()

    def brier(a):
        a = torch.as_tensor(a, dtype=torch.float64)[..., None, None]
        return (a * p1 + (1 - a) * p0 - onehot).square().sum(-1).mean(-1).numpy()

    assert est.gt_weight == pytest.approx(grid_argmin(brier), abs=2e-6)
    assert (est.objective, est.objective_a0, est.objective_a1) == pytest.approx([float(brier(x)) for x in (est.gt_weight, 0.0, 1.0)])
    assert est.gt_weight == pytest.approx(gt_weight.brier_optimal_weight(p0.numpy(), p1.numpy(), onehot.numpy()))


# --------------------------------------------------------------------------- kernel ridge regression

# The 11 noisy samples of sin(2 pi x) of Mobahi, Farajtabar & Bartlett (2020) on x = 0, 0.1, .., 1,
# as used in Borup & Andersen's toy example (RBF gamma = 80, ridge 0.2, MSE to the sinusoid on 101 points).
MOBAHI_Y = np.array([
    0.38476636465198066, 1.2333967683416893, 1.33232242218057, 0.69201594888895180, -0.29756145531871736,
    -0.24189291901377769, -0.7964485769175675, -0.9616480167034174, -0.49672509509916934,
    -0.3469066003991437, 0.5589512650600734,
])
#: The toy example's printed MSEs, steps 1..6 and the limit, for a = 0, 0.25, 0.35.
NOTEBOOK_MSE = {
    0.0: [0.16477, 0.15076, 0.14915, 0.15561, 0.16735, 0.18251, 0.49505],
    0.25: [0.16477, 0.15309, 0.14958, 0.14903, 0.14946, 0.15011, 0.15250],
    0.35: [0.16477, 0.15424, 0.15089, 0.14983, 0.14954, 0.14948, 0.14959],
}
LAM = 0.2


@pytest.fixture(scope="module")
def krr():
    x_train = np.arange(0, 1.1, 0.1).reshape(-1, 1)
    x = np.arange(0, 1.01, 0.01).reshape(-1, 1)
    return rbf_kernel(x_train, gamma=80), rbf_kernel(x, x_train, gamma=80), np.sin(2 * np.pi * x[:, 0])


def mse(k_x, beta, truth):
    return float(np.mean((k_x @ beta - truth) ** 2))


@pytest.mark.parametrize("a", sorted(NOTEBOOK_MSE))
def test_kernel_ridge_chain_reproduces_the_toy_example(krr, a):
    gram, k_x, truth = krr
    betas = kernel_ridge.dual_coefficients(gram, MOBAHI_Y, LAM, a, 6)
    got = [mse(k_x, b, truth) for b in betas] + [mse(k_x, kernel_ridge.limit_dual_coefficients(gram, MOBAHI_Y, LAM, a), truth)]
    np.testing.assert_allclose(got, NOTEBOOK_MSE[a], atol=5e-6)


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
def test_kernel_ridge_recursion_equals_refitting(krr, a):
    """The spectral recursion equals fitting the mixed target step by step (direct linear solves)."""
    gram, _, _ = krr
    solve = np.linalg.inv(gram + LAM * np.eye(len(MOBAHI_Y)))
    previous = MOBAHI_Y
    d, vt = np.linalg.eigh(gram)
    factors = kernel_ridge.spectral_factors(np.clip(d, 0, None), LAM, a, 5)
    for beta, b in zip(kernel_ridge.dual_coefficients(gram, MOBAHI_Y, LAM, a, 5), factors):
        refit = solve @ (a * MOBAHI_Y + (1 - a) * previous)
        np.testing.assert_allclose(beta, refit, atol=1e-9)
        previous = gram @ refit
        np.testing.assert_allclose(vt @ (b * (vt.T @ MOBAHI_Y)), previous, atol=1e-9)  # yhat = V^T B V y


def test_kernel_ridge_limit_is_amplified_ridge(krr):
    gram, _, _ = krr
    d = np.clip(np.linalg.eigvalsh(gram), 0, None)
    many = kernel_ridge.spectral_factors(d, LAM, 0.35, 3000)[-1]
    np.testing.assert_allclose(many, kernel_ridge.limit_factor(d, LAM, 0.35), atol=1e-10)
    np.testing.assert_allclose(kernel_ridge.limit_dual_coefficients(gram, MOBAHI_Y, LAM, 0.35),
                               np.linalg.solve(gram + LAM / 0.35 * np.eye(11), MOBAHI_Y), atol=1e-9)
    assert np.abs(kernel_ridge.spectral_factors(d, LAM, 0.0, 3000)[-1]).max() < 1e-3  # a = 0 collapses


def test_closed_form_optimal_weight_per_step_matches_grid_search(krr):
    """Greedy per-step optimum against the true function: closed form = 1001-point grid argmin."""
    gram, k_x, truth = krr
    solve = np.linalg.inv(gram + LAM * np.eye(11))
    previous = gram @ solve @ MOBAHI_Y  # step 1 (a plays no role)
    chosen = []
    for _ in (2, 3):
        f0, f1 = k_x @ solve @ previous, k_x @ solve @ MOBAHI_Y  # the a = 0 and a = 1 students
        a = gt_weight.brier_optimal_weight(f0, f1, truth)

        def step_mse(w):
            w = np.asarray(w)[..., None]
            return np.mean((f0 + w * (f1 - f0) - truth) ** 2, -1)

        assert a == pytest.approx(grid_argmin(step_mse, 1001, refine=False), abs=1e-3)
        assert step_mse(a) <= step_mse(np.linspace(0, 1, 1001)).min() + 1e-12
        chosen.append((a, step_mse(a)))
        previous = gram @ solve @ (a * MOBAHI_Y + (1 - a) * previous)
    assert chosen[0][0] == 0.0  # step 2: pure distillation is best
    assert (chosen[1][0], float(chosen[1][1])) == pytest.approx((0.13508, 0.148764), abs=1e-5)  # better than any fixed a at step 3


# --------------------------------------------------------------------------------- toy data and report


def test_label_noise_corrupts_training_references_only(tmp_path):
    splits = {"train": 300, "valid": 50}
    write_corpus(str(tmp_path / "clean"), splits, vocab_size=20, ambiguous_fraction=0.0, seed=3)
    write_corpus(str(tmp_path / "noisy"), splits, vocab_size=20, ambiguous_fraction=0.0, seed=3, label_noise=0.3)

    def read(kind, name):
        return (tmp_path / kind / name).read_text().splitlines()

    for name in ("train.src", "valid.src", "valid.tgt"):
        assert read("clean", name) == read("noisy", name), name
    clean = [w for line in read("clean", "train.tgt") for w in line.split()]
    noisy = [w for line in read("noisy", "train.tgt") for w in line.split()]
    changed = np.mean([c != n for c, n in zip(clean, noisy)])
    assert len(clean) == len(noisy) and 0.2 < changed < 0.35  # 0.3 * (1 - 1/20) expected
    with pytest.raises(ValueError, match="label_noise"):
        write_corpus(str(tmp_path / "bad"), splits, label_noise=1.5)


def test_chain_report(tmp_path):
    """Per-step metrics from fairseq-pdd-generate's JSONL records, against hand computation."""
    def records(hyp, nll, entropy, confidence, correct):
        common = {"reference": "a b c d e", "score": -1.0, "log_prob": -3.0, "sequence": {"nll": 1.0}}
        forced = {**common, "rank": -1, "hypothesis": "a b c d e", "token": {"nll": nll, "total_uncertainty": entropy},
                  "token_confidence": confidence, "token_correct": correct}
        return [{**common, "id": 0, "rank": 0, "hypothesis": hyp}, {**forced, "id": 0}]

    path = tmp_path / "step.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records("a b c d e", [0.5, 1.0, 1.5, 3.0], [1, 2, 3, 2],
                                                             [0.9, 0.8, 0.6, 0.2], [1, 1, 0, 0])))
    rows = chain_report.chain_rows([str(path)], [0.4])
    expected_ece = (1 * 0.1 + 1 * 0.2 + 1 * 0.6 + 1 * 0.2) / 4
    assert rows[0]["gt_weight"] == 0.4 and rows[0]["quality"] == pytest.approx(100.0)
    assert (rows[0]["nll"], rows[0]["entropy"], rows[0]["accuracy"]) == pytest.approx((1.5, 2.0, 0.5))
    assert rows[0]["ece"] == pytest.approx(expected_ece)
    assert "0.400" in chain_report.format_table(rows)
    with pytest.raises(ValueError, match="2 ground-truth weights"):
        chain_report.chain_rows([str(path)], [0.4, 0.5])
