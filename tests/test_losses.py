"""The fused per-token losses against torch.distributions oracles: value, log-normaliser, gradient, dtypes, padding, chunking, errors."""
from dataclasses import dataclass

import pytest
import torch
from torch.distributions import Categorical, Dirichlet, kl_divergence

from fairseq_pdd.distill import dirichlet, fused, losses
from fairseq_pdd.distill.ensemble_stats import ensemble_statistics

LOSSES = ("rkl", "fkl", "nll", "kd")


@dataclass
class Problem:
    """Student logits and the detached ensemble targets of N tokens."""

    z: torch.Tensor  # (N, K) student logits
    member_log_probs: torch.Tensor  # (M, N, K) float64, what the ensemble fed the accumulator
    pbar: torch.Tensor  # (N, K)
    mlog: torch.Tensor  # (N, K)
    beta0: torch.Tensor  # (N,) proxy precision ("mkl")


def make_problem(n, k, dtype=torch.float64, seed=0, m=3, logit_scale=2.0, teacher_scale=3.0):
    """Random student logits; targets streamed from M real members (softmax of random logits)."""
    g = torch.Generator().manual_seed(seed)
    members = torch.stack([(torch.randn(n, k, generator=g, dtype=torch.float64) * teacher_scale).log_softmax(-1) for _ in range(m)])
    stats = ensemble_statistics(iter(members))
    beta0 = dirichlet.proxy_precision(stats.mkl, stats.epkl, k, "mkl")
    z = (torch.randn(n, k, generator=g, dtype=torch.float64) * logit_scale).to(dtype)
    target_dtype = fused.compute_dtype(dtype)
    pbar = stats.mean_probs.double()
    pbar = pbar / pbar.sum(-1, keepdim=True)  # Categorical(probs=...) in the KD oracle renormalises
    return Problem(
        z=z,
        member_log_probs=members,
        pbar=pbar.to(target_dtype),
        mlog=stats.mean_log_probs.to(target_dtype),
        beta0=beta0.to(target_dtype),
    )


def proxy_scale(prob, target_offset):
    """The reverse-KL scale B = beta0 + K * target_offset."""
    return prob.beta0 + prob.z.shape[-1] * target_offset


def library_loss(name, z, prob, parametrization="exp", model_offset=0.0, target_offset=1.0, logit_scale=1.0):
    """(loss, log-normaliser) of the library on logits ``logit_scale * z`` with the targets of ``prob``."""
    if name == "rkl":
        return losses.rkl_proxy_loss(z, prob.pbar, proxy_scale(prob, target_offset), parametrization, model_offset,
                                     logit_scale=logit_scale)
    if name == "fkl":
        return losses.fkl_proxy_loss(z, prob.pbar, prob.beta0, target_offset, parametrization, model_offset,
                                     logit_scale=logit_scale)
    if name == "nll":
        return losses.dirichlet_nll_loss(z, prob.mlog, parametrization, model_offset, logit_scale=logit_scale)
    if name == "kd":
        return losses.mean_kd_loss(z, prob.pbar, logit_scale=logit_scale)
    raise AssertionError(name)


def oracle_loss(name, z, prob, parametrization="exp", model_offset=0.0, target_offset=1.0):
    """(loss, log-normaliser) from torch.distributions in float64, differentiable in ``z``."""
    pbar = prob.pbar.double()
    if name == "kd":
        return kl_divergence(Categorical(probs=pbar), Categorical(logits=z)), z.logsumexp(-1)
    alpha = dirichlet.concentrations(z, parametrization, model_offset)
    log_a0 = alpha.sum(-1).log()
    student = Dirichlet(alpha, validate_args=False)
    if name == "rkl":
        scale = proxy_scale(prob, target_offset).double()
        target = Dirichlet(scale.unsqueeze(-1) * pbar + 1.0, validate_args=False)
        return kl_divergence(student, target) / scale, log_a0
    if name == "fkl":
        target = Dirichlet(prob.beta0.double().unsqueeze(-1) * pbar + target_offset, validate_args=False)
        return kl_divergence(target, student), log_a0
    if name == "nll":
        members = prob.member_log_probs.double().exp()  # (M, N, K)
        return -student.log_prob(members).mean(0), log_a0
    raise AssertionError(name)


def loss_and_grad(fn, z, weights):
    """Per-token loss, log-normaliser and d(sum_n w_n loss_n)/dz of ``fn(z)``."""
    z = z.detach().clone().requires_grad_()
    loss, log_norm = fn(z)
    (grad,) = torch.autograd.grad((loss * weights.to(loss.dtype)).sum(), z)
    return loss.detach(), log_norm.detach(), grad


def oracle_loss_and_grad(name, prob, weights, **kwargs):
    return loss_and_grad(lambda z: oracle_loss(name, z, prob, **kwargs), prob.z.double(), weights.double())


def library_loss_and_grad(name, prob, weights, z=None, **kwargs):
    z = prob.z if z is None else z
    return loss_and_grad(lambda z: library_loss(name, z, prob, **kwargs), z, weights)


def assert_within(got, want, rtol, atol=0.0):
    """|got - want| <= atol + rtol |want| elementwise; ``atol`` may be a tensor."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    excess = (got - want).abs() - (atol + rtol * want.abs())
    worst = excess.argmax()
    assert (excess <= 0).all(), (
        f"max excess {excess.flatten()[worst].item():.3e} at {worst.item()}: "
        f"got {got.flatten()[worst].item():.17g}, want {want.flatten()[worst].item():.17g}"
    )


def row_weights(n, seed=1):
    """Upstream gradient per token, so backward must scale each row by its own weight."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5


def loss_configs(names=LOSSES, offsets=((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)), extra=()):
    """pytest params (loss, parametrization, model_offset, target_offset, *extra).

    ``offsets`` are (model_offset, target_offset) pairs; KD has no Dirichlet options and the NLL no
    target offset.
    """
    configs = []
    suffix = "".join(f"-{value}" for value in extra)
    for name in names:
        if name == "kd":
            configs.append(pytest.param(name, "exp", 0.0, 0.0, *extra, id="kd" + suffix))
            continue
        pairs = sorted({(m, 0.0) for m, _ in offsets}) if name == "nll" else offsets
        for parametrization in dirichlet.PARAMETRIZATIONS:
            for model_offset, target_offset in pairs:
                configs.append(
                    pytest.param(
                        name, parametrization, model_offset, target_offset, *extra,
                        id=f"{name}-{parametrization}-m{model_offset:g}-t{target_offset:g}{suffix}",
                    )
                )
    return configs


# 1. oracles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [5, 40])
@pytest.mark.parametrize("name, parametrization, model_offset, target_offset", loss_configs())
def test_float64_matches_oracle(name, parametrization, model_offset, target_offset, k):
    prob = make_problem(n=6, k=k, seed=k)
    weights = row_weights(6)
    options = dict(parametrization=parametrization, model_offset=model_offset, target_offset=target_offset)
    loss, log_norm, grad = library_loss_and_grad(name, prob, weights, **options)
    want_loss, want_log_norm, want_grad = oracle_loss_and_grad(name, prob, weights, **options)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    assert_within(loss, want_loss, rtol=1e-8, atol=1e-12)
    assert_within(log_norm, want_log_norm, rtol=1e-12, atol=1e-14)
    assert_within(grad, want_grad, rtol=1e-8, atol=1e-10 * want_grad.abs().max())


@pytest.mark.parametrize("logit_scale", [0.25, 3.0])
@pytest.mark.parametrize("name, parametrization, model_offset, target_offset", loss_configs())
def test_logit_scale_is_the_loss_of_scaled_logits_with_the_gradient_of_the_given_ones(
        name, parametrization, model_offset, target_offset, logit_scale):
    """``logit_scale`` s (a tempered student's 1/T): the oracle's loss of ``s * z``, autograd through the product
    giving ``dL/dz = s dL/d(s z)``."""
    prob = make_problem(n=6, k=9, seed=23)
    weights = row_weights(6)
    options = dict(parametrization=parametrization, model_offset=model_offset, target_offset=target_offset)
    loss, log_norm, grad = library_loss_and_grad(name, prob, weights, logit_scale=logit_scale, **options)
    want_loss, want_log_norm, want_grad = loss_and_grad(
        lambda z: oracle_loss(name, z * logit_scale, prob, **options), prob.z.double(), weights.double())
    assert_within(loss, want_loss, rtol=1e-8, atol=1e-12)
    assert_within(log_norm, want_log_norm, rtol=1e-12, atol=1e-14)
    assert_within(grad, want_grad, rtol=1e-8, atol=1e-10 * want_grad.abs().max())


@pytest.mark.parametrize(
    "name, parametrization, model_offset, target_offset, k",
    loss_configs(extra=(1000,)) + loss_configs(offsets=((0.0, 0.0), (1.0, 1.0)), extra=(40000,)),
)
def test_float32_large_vocabulary_matches_oracle(name, parametrization, model_offset, target_offset, k):
    prob = make_problem(n=3, k=k, dtype=torch.float32, seed=k)
    weights = row_weights(3).float()
    options = dict(parametrization=parametrization, model_offset=model_offset, target_offset=target_offset)
    loss, log_norm, grad = library_loss_and_grad(name, prob, weights, **options)
    want_loss, want_log_norm, want_grad = oracle_loss_and_grad(name, prob, weights, **options)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    # Observed: loss within 1e-5 relative, gradient within 1e-6 of its largest entry.
    assert_within(loss, want_loss, rtol=1e-4)
    assert_within(log_norm, want_log_norm, rtol=1e-6)
    assert_within(grad, want_grad, rtol=1e-3, atol=1e-5 * want_grad.abs().max())


@pytest.mark.parametrize("name, parametrization, model_offset, target_offset", loss_configs())
def test_gradient_matches_finite_differences(name, parametrization, model_offset, target_offset):
    prob = make_problem(n=2, k=3, seed=7)
    options = dict(parametrization=parametrization, model_offset=model_offset, target_offset=target_offset)
    z = prob.z.clone().requires_grad_()
    (grad,) = torch.autograd.grad(library_loss(name, z, prob, **options)[0].sum(), z)
    numeric = torch.zeros_like(z)
    h = 1e-6
    for index in range(z.numel()):
        step = torch.zeros(z.numel(), dtype=z.dtype)
        step[index] = h
        step = step.view_as(z)
        plus = library_loss(name, prob.z + step, prob, **options)[0].sum()
        minus = library_loss(name, prob.z - step, prob, **options)[0].sum()
        numeric.view(-1)[index] = (plus - minus) / (2 * h)
    assert_within(grad, numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", LOSSES)
def test_torch_gradcheck(name):
    prob = make_problem(n=2, k=3, seed=3)
    z = prob.z.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: library_loss(name, z, prob, model_offset=1.0)[0], (z,))


# 2. padding and row independence ---------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
def test_padded_batch_sums_non_pad_positions_only(name):
    batch, length, k = 3, 5, 7
    prob = make_problem(n=batch * length, k=k, seed=11)
    mask = torch.arange(length) < torch.tensor([5, 2, 4]).unsqueeze(-1)  # (B, T), True = token
    flat_mask = mask.reshape(-1)
    z = prob.z.view(batch, length, k).clone().requires_grad_()
    tokens = Problem(
        z=z[mask],
        member_log_probs=prob.member_log_probs[:, flat_mask],
        pbar=prob.pbar[flat_mask],
        mlog=prob.mlog[flat_mask],
        beta0=prob.beta0[flat_mask],
    )
    total = library_loss(name, tokens.z, tokens, model_offset=1.0)[0].sum()
    (grad,) = torch.autograd.grad(total, z)

    full = prob.z.clone().requires_grad_()
    per_position = oracle_loss(name, full, prob, model_offset=1.0)[0]
    want_total = torch.where(flat_mask, per_position, torch.zeros_like(per_position)).sum()
    (want_grad,) = torch.autograd.grad(want_total, full)
    assert_within(total.detach(), want_total.detach(), rtol=1e-9)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert_within(grad.reshape(-1, k), want_grad, rtol=1e-8, atol=1e-10 * want_grad.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", LOSSES)
def test_rows_are_independent(name, dtype):
    prob = make_problem(n=4, k=9, dtype=dtype, seed=5)
    other = make_problem(n=4, k=9, dtype=dtype, seed=6)
    mixed = Problem(
        z=torch.cat([prob.z[:1], other.z[1:]]),
        member_log_probs=torch.cat([prob.member_log_probs[:, :1], other.member_log_probs[:, 1:]], 1),
        pbar=torch.cat([prob.pbar[:1], other.pbar[1:]]),
        mlog=torch.cat([prob.mlog[:1], other.mlog[1:]]),
        beta0=torch.cat([prob.beta0[:1], other.beta0[1:]]),
    )
    weights = row_weights(4).to(dtype)
    loss, log_norm, grad = library_loss_and_grad(name, prob, weights)
    mixed_loss, mixed_log_norm, mixed_grad = library_loss_and_grad(name, mixed, weights)
    assert torch.equal(loss[0], mixed_loss[0])
    assert torch.equal(log_norm[0], mixed_log_norm[0])
    assert torch.equal(grad[0], mixed_grad[0])
    assert not torch.equal(loss[1:], mixed_loss[1:])


# 3. half-precision logits ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("name, parametrization, model_offset, target_offset", loss_configs())
def test_half_precision_logits(name, parametrization, model_offset, target_offset, dtype, rtol):
    # Mild teachers keep every gradient far below the float16 range (fkl with target_offset 0
    # has gradients ~ alpha / (beta0 pbar_k), which overflow float16 for confident teachers).
    prob = make_problem(n=5, k=50, dtype=torch.float32, seed=17, teacher_scale=1.0)
    weights = row_weights(5).float()
    options = dict(parametrization=parametrization, model_offset=model_offset, target_offset=target_offset)
    half = prob.z.to(dtype)
    loss, log_norm, grad = library_loss_and_grad(name, prob, weights, z=half, **options)
    want_loss, want_log_norm, want_grad = library_loss_and_grad(name, prob, weights, z=half.float(), **options)
    assert want_grad.abs().max() < 1e3
    assert loss.dtype == torch.float32 and log_norm.dtype == torch.float32
    assert grad.dtype == dtype
    assert_within(loss, want_loss, rtol=1e-6, atol=1e-6)
    assert_within(log_norm, want_log_norm, rtol=1e-6, atol=1e-6)
    assert_within(grad, want_grad, rtol=rtol, atol=1e-3 * want_grad.abs().max())


# 4. extreme logits -----------------------------------------------------------------------------


def extreme_logits(k=6):
    rows = [
        [1e4] * k,
        [-1e4] * k,
        [80.0] * k,
        [-80.0] * k,
        [1e4, -1e4, 80.0, -80.0, 0.0, 3.0],
        [1e4, 0.0, 0.0, 0.0, 0.0, 0.0],
        [-1e4, -1e4, -1e4, -1e4, -1e4, 30.0],
        [88.0, 87.0, -88.0, -87.0, 40.0, -40.0],
    ]
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("name, parametrization, model_offset, target_offset", loss_configs())
def test_extreme_logits_give_finite_loss_and_gradient(name, parametrization, model_offset, target_offset):
    z = extreme_logits()
    prob = make_problem(n=z.shape[0], k=z.shape[1], dtype=torch.float32, seed=17)
    options = dict(parametrization=parametrization, model_offset=model_offset, target_offset=target_offset)
    loss, log_norm, grad = library_loss_and_grad(name, prob, torch.ones(z.shape[0]), z=z, **options)
    assert torch.isfinite(loss).all(), loss
    assert torch.isfinite(log_norm).all(), log_norm
    assert torch.isfinite(grad).all(), grad


# 5. chunking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 10])
@pytest.mark.parametrize("name, parametrization, model_offset, target_offset", loss_configs())
def test_chunked_equals_unchunked(monkeypatch, name, parametrization, model_offset, target_offset, k):
    # float64: vectorised and scalar tails of softplus etc. may differ in the last ulp.
    prob = make_problem(n=9, k=k, seed=19)
    weights = row_weights(9)
    options = dict(parametrization=parametrization, model_offset=model_offset, target_offset=target_offset)
    whole = library_loss_and_grad(name, prob, weights, **options)
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 7)
    chunked = library_loss_and_grad(name, prob, weights, **options)
    for got, want in zip(chunked, whole):
        assert_within(got, want, rtol=1e-13, atol=1e-13 * want.abs().max())


def recording_kernel(calls):
    """A kernel (loss = sum z * t, gradient t) that records the rows and need_grad of each call."""

    def kernel(z, t, *, need_grad):
        calls.append((z.shape[0], need_grad))
        return (z * t).sum(-1), (t.clone() if need_grad else None), z.logsumexp(-1)

    return kernel


def test_tiny_chunk_budget_splits_rows(monkeypatch):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 7)
    calls = []
    z = torch.randn(9, 3, requires_grad=True)
    t = torch.randn(9, 3)
    loss, _ = fused.chunked_token_loss(recording_kernel(calls), z, t)
    assert calls == [(2, True)] * 4 + [(1, True)]
    loss.sum().backward()
    assert torch.equal(z.grad, t)


# 6. no-grad path -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, parametrization, model_offset, target_offset", loss_configs())
def test_no_grad_gives_same_values_without_graph(name, parametrization, model_offset, target_offset):
    prob = make_problem(n=4, k=8, dtype=torch.float32, seed=23)
    options = dict(parametrization=parametrization, model_offset=model_offset, target_offset=target_offset)
    z = prob.z.clone().requires_grad_()
    loss, log_norm = library_loss(name, z, prob, **options)
    with torch.no_grad():
        quiet_loss, quiet_log_norm = library_loss(name, z, prob, **options)
    constant_loss, _ = library_loss(name, prob.z, prob, **options)  # logits without requires_grad
    assert loss.requires_grad and not log_norm.requires_grad
    for value in (quiet_loss, quiet_log_norm, constant_loss):
        assert not value.requires_grad and value.grad_fn is None
    assert torch.equal(quiet_loss, loss.detach())
    assert torch.equal(quiet_log_norm, log_norm)
    assert torch.equal(constant_loss, loss.detach())


@pytest.mark.parametrize("no_grad, requires_grad", [(True, True), (False, False)])
def test_no_grad_skips_gradient_in_kernel(no_grad, requires_grad):
    calls = []
    z = torch.randn(4, 3, requires_grad=requires_grad)
    with torch.set_grad_enabled(not no_grad):
        loss, _ = fused.chunked_token_loss(recording_kernel(calls), z, torch.randn(4, 3))
    assert calls == [(4, False)]
    assert loss.grad_fn is None


# 7. bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 4), (5,)])
def test_non_matrix_logits_raise(shape):
    with pytest.raises(ValueError, match=r"expected \(N, K\) logits"):
        fused.chunked_token_loss(recording_kernel([]), torch.zeros(shape), torch.zeros(shape[0]))


def test_mismatched_target_rows_raise():
    with pytest.raises(ValueError, match=r"target rows \(3\) do not match logit rows \(4\)"):
        fused.chunked_token_loss(recording_kernel([]), torch.zeros(4, 5), torch.zeros(3, 5))


def test_losses_validate_their_inputs():
    prob = make_problem(n=4, k=5, dtype=torch.float32)
    with pytest.raises(ValueError, match="expected"):
        losses.mean_kd_loss(prob.z.view(2, 2, 5), prob.pbar.view(2, 2, 5))
    with pytest.raises(ValueError, match="do not match"):
        losses.rkl_proxy_loss(prob.z, prob.pbar[:3], prob.beta0)


def test_unknown_parametrization_names_the_choices():
    prob = make_problem(n=2, k=5, dtype=torch.float32)
    for call in (
        lambda: dirichlet.concentrations(prob.z, "relu"),
        lambda: losses.dirichlet_nll_loss(prob.z, prob.mlog, parametrization="relu"),
    ):
        with pytest.raises(ValueError, match=r"'relu'.*'exp', 'softplus'"):
            call()


def test_unknown_target_concentration_names_the_choices():
    mkl = torch.ones(2)
    with pytest.raises(ValueError, match=r"'kl'.*'mkl', 'epkl'"):
        dirichlet.proxy_precision(mkl, mkl, 5, "kl")
