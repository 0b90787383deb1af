"""The Triton kernels against the torch reference, on CPU with Triton's interpreter.

Triton picks its interpreter when a kernel is defined, and its own library (``tl.zeros_like``, ``tl.sum``,
...) is defined when triton is imported, so ``TRITON_INTERPRET=1`` must be set before anything imports
triton. ``tests/test_triton_kernels.py`` therefore runs this module in a child pytest with it set (the
rest of the suite never sees the variable); run it directly with::

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/triton_kernel_checks.py
"""
import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (tests/test_triton_kernels.py sets it)",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fairseq_pdd.decoding import triton_measures, uncertainty  # noqa: E402
from fairseq_pdd.distill import (  # noqa: E402
    backend, dirichlet, ensemble_stats, losses, special, triton_losses, triton_stats,
)
from test_losses import (  # noqa: E402 (tests/ is on sys.path, see conftest.py)
    LOSSES, Problem, assert_within, extreme_logits, library_loss, library_loss_and_grad, loss_configs, make_problem,
    row_weights,
)


@pytest.fixture
def use(monkeypatch):
    """``use("triton")`` / ``use("torch")``: the backend of the following loss calls."""
    return lambda choice: monkeypatch.setenv(backend.ENV_VAR, choice)


# 1. special functions ----------------------------------------------------------------------------


@triton.jit
def _apply_special(x_ptr, out_ptr, n, FUNCTION: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(x_ptr + i, mask=mask, other=1.0)
    if FUNCTION == "digamma":
        y = special.digamma(x)
    elif FUNCTION == "digamma1p":
        y = special.digamma1p(x)
    elif FUNCTION == "trigamma":
        y = special.trigamma(x)
    else:
        y = special.lgamma(x)
    tl.store(out_ptr + i, y, mask=mask)


def special_of(name, x):
    """``special.<name>`` of a float32 tensor, elementwise."""
    out = torch.empty_like(x)
    _apply_special[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), FUNCTION=name, BLOCK=1024)
    return out


SPECIAL_ORACLES = {
    "digamma": torch.special.digamma,
    "digamma1p": lambda x: torch.special.digamma(1 + x),
    "trigamma": lambda x: torch.special.polygamma(1, x),
    "lgamma": torch.lgamma,
}


@pytest.mark.parametrize("name", sorted(SPECIAL_ORACLES))
def test_special_functions_match_torch_from_1e_minus_6_to_1e8(name):
    x = torch.cat([
        torch.logspace(-6, 8, 2801, dtype=torch.float64),
        torch.linspace(0.5, 3.0, 501, dtype=torch.float64),  # digamma's root, lgamma's roots 1 and 2
        torch.tensor([1.4616321449683622, 1.0, 2.0, 7.999999, 8.0, 2.5, 1.5], dtype=torch.float64),
    ]).float()
    got = special_of(name, x).double()
    want = SPECIAL_ORACLES[name](x.double())  # float64 torch at the float32 points
    torch32 = SPECIAL_ORACLES[name](x).double()
    scale = want.abs().clamp(min=1.0)
    error, torch_error = ((got - want).abs() / scale).max().item(), ((torch32 - want).abs() / scale).max().item()
    # Observed: digamma 6e-7 (torch 7e-7), trigamma 2e-7 (3e-7), lgamma 2e-7 (6e-8), digamma1p 5e-7.
    assert error <= 1e-6, (error, torch_error)


def test_digamma1p_keeps_the_digits_of_differences_of_small_arguments():
    x = torch.logspace(-7, math.log10(0.124), 400, dtype=torch.float64).float()
    y = x * 0.75
    got = (special_of("digamma1p", x) - special_of("digamma1p", y)).double()
    want = torch.special.digamma(1 + x.double()) - torch.special.digamma(1 + y.double())
    # two float32 roundings of values near -0.58 (6e-8 each); digamma(1 + x) itself is off by up to 5e-7 there
    assert_within(got, want, rtol=1e-5, atol=1.2e-7)


def test_special_functions_at_zero():
    zero = torch.zeros(3)
    assert special_of("digamma", zero).eq(float("-inf")).all()
    assert special_of("trigamma", zero).eq(float("inf")).all()
    assert special_of("lgamma", zero).eq(float("inf")).all()


# 2. the four losses against the torch path -------------------------------------------------------


def check_against_reference(use, name, prob, weights, z=None, rtol=1e-5, value_atol=0.0, **options):
    """Loss, log-normaliser and gradient by the kernel against the torch path's in float64: within ``rtol``
    relative (plus ``value_atol`` for the loss), or no further than twice the torch path's own float32 error
    (the values are sums whose terms cancel, e.g. ``lnG(a0) - sum_k lnG(alpha_k)``, so float32 loses digits
    whichever way it adds them); a half-precision gradient also within two units of its dtype. And the same
    dtypes and shapes as the torch path in the logits' dtype."""
    z = prob.z if z is None else z
    use("triton")
    got = library_loss_and_grad(name, prob, weights, z=z, **options)
    use("torch")
    single = library_loss_and_grad(name, prob, weights, z=z, **options)
    exact = library_loss_and_grad(name, prob, weights.double(), z=z.double(), **options)
    for index, (g, s, x) in enumerate(zip(got, single, exact)):
        assert g.dtype == s.dtype and g.shape == s.shape
        scale = x.abs().max() if index == 2 else x.abs()  # gradient entries: relative to the largest
        tolerance = torch.maximum(rtol * scale, 2 * (s.double() - x).abs().max())
        if index == 0:
            tolerance = tolerance + value_atol
        if index == 2:  # two units of the stored dtype: Triton's interpreter truncates float32 -> bfloat16
            tolerance = torch.maximum(tolerance, 2 * torch.finfo(g.dtype).eps * x.abs())
        assert_within(g, x, rtol=0.0, atol=tolerance)


@pytest.mark.parametrize(
    "name, parametrization, model_offset, target_offset, k, block",
    loss_configs(extra=(37, 1024))  # one partial tile
    + loss_configs(offsets=((0.0, 0.0), (1.0, 1.0)), extra=(300, 128)),  # three tiles, the last partial
)
def test_float32_matches_torch_path(use, monkeypatch, name, parametrization, model_offset, target_offset,
                                    k, block):
    monkeypatch.setattr(triton_losses, "MAX_BLOCK", block)
    prob = make_problem(n=5, k=k, dtype=torch.float32, seed=k)
    options = dict(parametrization=parametrization, model_offset=model_offset, target_offset=target_offset)
    check_against_reference(use, name, prob, row_weights(5).float(), **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name, parametrization, model_offset, target_offset", loss_configs(
    offsets=((0.0, 0.0), (1.0, 1.0))))
def test_logit_scale_matches_torch_path(use, monkeypatch, name, parametrization, model_offset, target_offset, dtype):
    """A tempered student's ``logit_scale`` 1/T, applied as the kernel reads the logits (three tiles)."""
    monkeypatch.setattr(triton_losses, "MAX_BLOCK", 16)
    prob = make_problem(n=4, k=40, dtype=torch.float32, seed=29)
    options = dict(parametrization=parametrization, model_offset=model_offset, target_offset=target_offset)
    check_against_reference(use, name, prob, row_weights(4).float(), z=prob.z.to(dtype), logit_scale=0.4, **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", LOSSES)
def test_half_precision_logits_are_read_directly(use, name, dtype):
    prob = make_problem(n=4, k=50, dtype=torch.float32, seed=17, teacher_scale=1.0)
    half = prob.z.to(dtype)
    # Same half-precision inputs, so the same float32 values; the stored gradient rounds alike.
    check_against_reference(use, name, prob, row_weights(4).float(), z=half, model_offset=1.0, target_offset=1.0)


@pytest.mark.parametrize("name, parametrization, model_offset, target_offset", loss_configs())
def test_extreme_logits(use, name, parametrization, model_offset, target_offset):
    z = extreme_logits()
    prob = make_problem(n=z.shape[0], k=z.shape[1], dtype=torch.float32, seed=17)
    options = dict(parametrization=parametrization, model_offset=model_offset, target_offset=target_offset)
    # The clamped rows have lnG(a0) ~ 8e20: the loss is known to float32's resolution of its largest terms.
    alpha = dirichlet.concentrations(z.double(), parametrization, model_offset)
    terms = torch.lgamma(alpha.sum(-1)).abs() + torch.lgamma(alpha).abs().sum(-1)
    check_against_reference(use, name, prob, torch.ones(z.shape[0]), z=z, value_atol=1e-6 * terms, **options)


@pytest.mark.parametrize("name", LOSSES)
def test_padded_batch(use, name):
    batch, length, k = 3, 4, 41
    prob = make_problem(n=batch * length, k=k, dtype=torch.float32, seed=11)
    mask = torch.arange(length) < torch.tensor([4, 1, 3]).unsqueeze(-1)
    flat = mask.reshape(-1)
    tokens = Problem(z=prob.z[flat], member_log_probs=prob.member_log_probs[:, flat], pbar=prob.pbar[flat],
                     mlog=prob.mlog[flat], beta0=prob.beta0[flat])

    def total_and_grad():
        z = prob.z.view(batch, length, k).clone().requires_grad_()
        total = library_loss(name, z[mask], tokens, model_offset=1.0)[0].sum()
        return total.detach(), torch.autograd.grad(total, z)[0]

    use("triton")
    total, grad = total_and_grad()
    use("torch")
    want_total, want_grad = total_and_grad()
    assert_within(total, want_total, rtol=1e-5)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert_within(grad, want_grad, rtol=1e-5, atol=1e-5 * want_grad.abs().max())


@pytest.mark.parametrize("name", LOSSES)
def test_one_row_and_strided_rows(use, name):
    prob = make_problem(n=1, k=70, dtype=torch.float32, seed=29)
    check_against_reference(use, name, prob, torch.ones(1))
    wide = torch.randn(3, 90, generator=torch.Generator().manual_seed(2))
    strided = make_problem(n=3, k=70, dtype=torch.float32, seed=31)
    z = wide[:, 10:80]  # row stride 90, not K
    assert z.stride(0) == 90
    check_against_reference(use, name, strided, row_weights(3).float(), z=z)


@pytest.mark.parametrize("name", LOSSES)
def test_empty_batch(use, name):
    prob = make_problem(n=0, k=12, dtype=torch.float32)
    use("triton")
    z = prob.z.clone().requires_grad_()
    loss, log_norm = library_loss(name, z, prob, model_offset=1.0)
    assert loss.shape == (0,) and log_norm.shape == (0,)
    loss.sum().backward()
    assert z.grad.shape == (0, 12)


@pytest.mark.parametrize("name", LOSSES)
def test_no_grad_gives_the_same_values(use, name):
    prob = make_problem(n=3, k=20, dtype=torch.float32, seed=23)
    use("triton")
    z = prob.z.clone().requires_grad_()
    loss, log_norm = library_loss(name, z, prob, model_offset=1.0)
    with torch.no_grad():
        quiet_loss, quiet_log_norm = library_loss(name, z, prob, model_offset=1.0)
    assert quiet_loss.grad_fn is None and loss.grad_fn is not None
    assert torch.equal(quiet_loss, loss.detach()) and torch.equal(quiet_log_norm, log_norm)


def test_triton_path_validates_like_the_torch_path(use):
    prob = make_problem(n=4, k=5, dtype=torch.float32)
    use("triton")
    with pytest.raises(ValueError, match="expected"):
        losses.mean_kd_loss(prob.z.view(2, 2, 5), prob.pbar.view(2, 2, 5))
    with pytest.raises(ValueError, match="do not match"):
        losses.rkl_proxy_loss(prob.z, prob.pbar[:3], prob.beta0)
    with pytest.raises(ValueError, match="do not match"):
        losses.dirichlet_nll_loss(prob.z, prob.mlog[:, :4])
    with pytest.raises(ValueError, match=r"'relu'.*'exp', 'softplus'"):
        losses.dirichlet_nll_loss(prob.z, prob.mlog, parametrization="relu")


def allocated_peak_bytes(fn) -> int:
    """Peak of the bytes held by torch's CPU allocator during ``fn()`` above those held before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("name", LOSSES)
def test_forward_allocates_the_gradient_and_per_row_values_only(use, name):
    n, k = 6, 300
    prob = make_problem(n=n, k=k, dtype=torch.float32, seed=1)
    z = prob.z.clone().requires_grad_()
    use("triton")
    peak = allocated_peak_bytes(lambda: library_loss(name, z, prob, model_offset=1.0))
    # the torch path's chunk temporaries are several (N, K) here (whole batch in one chunk)
    assert n * k * 4 <= peak <= n * k * 4 + 256 * n


# 3. the ensemble statistics' accumulation --------------------------------------------------------

STAT_FIELDS = ("mean_probs", "mean_log_probs", "expected_entropy", "entropy_of_expected", "cross_entropy")


def member_log_probs(m, shape, dtype, seed=0):
    """M members' log-softmax of random logits; the first member gives one class of the first row
    probability 0 (log-probability -inf, so that row's mlog and -sum pbar mlog are -inf and +inf)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, *shape, generator=g) * 3.0
    if logits[0].numel():
        logits[0].view(-1, shape[-1])[0, 1] = float("-inf")
    return logits.log_softmax(-1).to(dtype)


def accumulated(members):
    """(statistics, the probabilities ``add`` returned per member (cloned))."""
    acc = ensemble_stats.EnsembleAccumulator()
    probs = [acc.add(lp).clone() for lp in members]
    return acc.finalize(), probs


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("shape, block", [((5, 37), 1024), ((4, 300), 128), ((2, 3, 41), 1024), ((1, 50), 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_accumulation_matches_torch_path(use, monkeypatch, m, shape, block, dtype):
    monkeypatch.setattr(triton_stats, "MAX_BLOCK", block)
    members = member_log_probs(m, shape, dtype, seed=m)
    use("triton")
    got, got_probs = accumulated(members)
    use("torch")
    want, want_probs = accumulated(members)
    assert got.num_models == want.num_models == m
    for field in STAT_FIELDS:
        g, w = getattr(got, field), getattr(want, field)
        assert g.dtype == w.dtype == torch.float32 and g.shape == w.shape, field
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, equal_nan=True, msg=field)  # inf, NaN alike
    for g, w in zip(got_probs, want_probs):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    for field in ("mutual_information", "epkl", "mkl"):  # the derived disagreements
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-4, atol=1e-5, equal_nan=True,
                                   msg=field)


def test_accumulation_of_a_class_every_member_rules_out(use):
    """p_k = 0 for every member: 0 log 0 = 0 on both paths, so -sum pbar mlog and the disagreements are finite."""
    members = member_log_probs(3, (4, 37), torch.float32, seed=5)
    members[:, 2, 11] = float("-inf")
    use("triton")
    got, _ = accumulated(members)
    use("torch")
    want, _ = accumulated(members)
    for field in ("cross_entropy", "mutual_information", "epkl", "mkl"):
        assert torch.isfinite(getattr(got, field)[1:]).all(), field  # row 0 has a class only one member rules out
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-4, atol=1e-5, equal_nan=True,
                                   msg=field)


def test_accumulation_of_an_empty_batch_and_without_probabilities(use):
    use("triton")
    acc = ensemble_stats.EnsembleAccumulator()
    assert acc.add(torch.zeros(0, 9)) is not None and acc.add(torch.zeros(0, 9), return_probs=False) is None
    stats = acc.finalize()
    assert stats.mean_probs.shape == (0, 9) and stats.entropy_of_expected.shape == (0,)
    members = member_log_probs(2, (3, 20), torch.float32)
    quiet = ensemble_stats.ensemble_statistics(iter(members))  # return_probs=False inside
    loud, _ = accumulated(members)
    for field in STAT_FIELDS:
        assert torch.equal(getattr(quiet, field), getattr(loud, field))
    with pytest.raises(ValueError, match=r"member 1 gives log-probabilities of shape \(3, 21\)"):
        acc = ensemble_stats.EnsembleAccumulator()
        acc.add(members[0])
        acc.add(torch.zeros(3, 21))


def member_logits(m, shape, dtype, seed=0):
    """M members' raw logits (scale 4); the first member masks one class of the first row (logit -inf)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, *shape, generator=g) * 4.0
    if logits[0].numel():
        logits[0].view(-1, shape[-1])[0, 1] = float("-inf")
    return logits.to(dtype)


def accumulated_from_logits(members, temperature, weights=None):
    """(statistics, each member's finiteness flags) of ``add_logits`` over the members."""
    acc = ensemble_stats.EnsembleAccumulator()
    flags = [acc.add_logits(z, temperature, weight=None if weights is None else weights[..., m])
             for m, z in enumerate(members)]
    return acc.finalize(), flags


def reference_from_logits(members, temperature, weights=None):
    """The torch path of ``add_logits`` by hand: float32 log_softmax(z / T), then ``add``."""
    acc = ensemble_stats.EnsembleAccumulator()
    for m, z in enumerate(members):
        acc.add((z.float() / temperature).log_softmax(-1), return_probs=False,
                weight=None if weights is None else weights[..., m])
    return acc.finalize()


@pytest.mark.parametrize("temperature", [1.0, 3.0, 0.7])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape, block, m", [((5, 37), 1024, 3), ((4, 300), 128, 2), ((2, 3, 41), 16, 1),
                                             ((1, 50), 1024, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_accumulation_from_logits_matches_torch_path(use, monkeypatch, temperature, weighted, shape, block, m, dtype):
    """The kernel's logsumexp and log-probabilities from raw logits (K over several tiles, a masked class) against
    torch's log_softmax then ``add``, and the torch path of ``add_logits`` against the same."""
    monkeypatch.setattr(triton_stats, "MAX_BLOCK", block)
    members = member_logits(m, shape, dtype, seed=m)
    g = torch.Generator().manual_seed(4)
    weights = torch.softmax(torch.randn(*shape[:-1], m, generator=g), -1) if weighted else None
    use("torch")
    want = reference_from_logits(members, temperature, weights)
    fields = STAT_FIELDS + (("mixture_entropy", "mixture_cross_entropy") if weighted else ())
    for choice in ("triton", "torch"):
        use(choice)
        got, flags = accumulated_from_logits(members, temperature, weights)
        assert got.num_models == m
        for field in fields:
            g_, w = getattr(got, field), getattr(want, field)
            assert g_.dtype == w.dtype == torch.float32 and g_.shape == w.shape, (choice, field)
            torch.testing.assert_close(g_, w, rtol=1e-5, atol=1e-6, equal_nan=True, msg=f"{choice} {field}")
        for member, flag in zip(members, flags):
            assert flag.dtype == torch.bool and flag.shape == shape[:-1]
            assert torch.equal(flag, torch.isfinite(member).all(-1)), choice


def test_accumulation_from_logits_flags_non_finite_rows_like_torch(use):
    """NaN and +inf logits, and a row of -inf only, are flagged on both paths with the same statistics."""
    members = member_logits(2, (5, 37), torch.float32, seed=6)
    members[1, 1, 4] = float("nan")
    members[1, 2, 0] = float("inf")
    members[0, 3] = float("-inf")
    results = {}
    for choice in ("triton", "torch"):
        use(choice)
        results[choice] = accumulated_from_logits(members, 2.0)
    (got, got_flags), (want, want_flags) = results["triton"], results["torch"]
    assert [f.tolist() for f in got_flags] == [f.tolist() for f in want_flags] == [
        [False, True, True, False, True], [True, False, False, True, True]]
    for field in STAT_FIELDS:
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-6, equal_nan=True,
                                   msg=field)


def test_accumulation_from_logits_of_an_empty_batch(use):
    use("triton")
    acc = ensemble_stats.EnsembleAccumulator()
    assert acc.add_logits(torch.zeros(0, 9, dtype=torch.float16), 2.0).shape == (0,)
    assert acc.add_logits(torch.zeros(0, 9, dtype=torch.float16), 2.0, weight=None).shape == (0,)
    stats = acc.finalize()
    assert stats.mean_probs.shape == (0, 9) and stats.entropy_of_expected.shape == (0,)


# 4. the Dirichlet measures (in the beam and in re-scoring) ---------------------------------------


def concentrations(n, k, dtype=torch.float32, seed=0):
    """Rows of concentrations from 1e-6 to 1e8: log-uniform entries, each row scaled by its own precision."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.rand(n, k, generator=g, dtype=torch.float64) * 12 - 6)
    precision = torch.logspace(-3, 8, max(n, 1), dtype=torch.float64)[:n].unsqueeze(-1)
    return (raw / raw.sum(-1, keepdim=True) * precision).clamp(min=1e-6).to(dtype)


@pytest.mark.parametrize("shape, block", [((6, 37), 1024), ((5, 300), 128), ((1, 50), 1024), ((2, 3, 41), 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dirichlet_measures_match_torch_path(use, monkeypatch, shape, block, dtype):
    monkeypatch.setattr(triton_measures, "MAX_BLOCK", block)
    n, k = math.prod(shape[:-1]), shape[-1]
    alpha = concentrations(n, k, torch.float32, seed=k).clamp(max=6e4 if dtype == torch.float16 else 1e8)
    alpha = alpha.to(dtype).view(shape)
    tokens = torch.randint(0, k, shape[:-1], generator=torch.Generator().manual_seed(1))
    use("triton")
    got = uncertainty.dirichlet_token_measures(alpha, tokens)
    use("torch")
    single = uncertainty.dirichlet_token_measures(alpha, tokens)
    exact = uncertainty.dirichlet_token_measures(alpha.double(), tokens)
    assert got.keys() == single.keys()
    for key in single:
        g, s, x = got[key], single[key], exact[key]
        assert g.dtype == s.dtype == torch.float32 and g.shape == s.shape, key
        # As the losses: within 2e-5, or no further than twice the torch path's float32 error (psi(a0 + 1) -
        # psi(alpha_k + 1) cancels for small concentrations, mkl = epkl - mi for large ones).
        assert_within(g, x, rtol=0.0, atol=torch.maximum(2e-5 * x.abs(), 2 * (s.double() - x).abs().max()))


def test_dirichlet_measures_reject_invalid_rows_like_torch(use):
    alpha = concentrations(5, 20)
    alpha[1, 3], alpha[2, 0], alpha[3, 7] = 0.0, float("nan"), float("inf")
    for choice in ("triton", "torch"):
        use(choice)
        with pytest.raises(ValueError, match="NaN, infinite or non-positive"):
            uncertainty.dirichlet_token_measures(alpha)
        mask = torch.tensor([True, False, False, False, True])
        measures = uncertainty.dirichlet_token_measures(alpha, mask=mask)  # bad rows masked out: no error
        assert torch.isfinite(measures["mutual_information"][mask]).all()
    use("triton")
    empty = uncertainty.dirichlet_token_measures(torch.zeros(0, 7) + 1.0)
    assert empty["epkl"].shape == (0,)


def test_in_beam_student_columns_match_torch_path(use):
    from fairseq_pdd.decoding.step_uncertainty import DirichletStepUncertainty

    alpha = concentrations(4, 30, seed=3)
    tokens = torch.tensor([[2], [2], [2], [2]])
    columns = {}
    for choice in ("triton", "torch"):
        use(choice)
        columns[choice] = DirichletStepUncertainty().step(alpha, tokens, eos=2)
    assert_within(columns["triton"], columns["torch"], rtol=2e-5, atol=1e-6 * columns["torch"].abs().max())


# 5. the ensemble's measures in the beam (statistics with the expectation-of-products mixture) -----


def ensemble_step_columns(members, order):
    """Columns (rows, C) of :class:`EnsembleStepUncertainty` at a second step, after the beam was re-ordered by
    ``order`` and extended by token 3, so that the EP weights ``softmax_m(log p_m(y_0))`` differ by member."""
    from fairseq_pdd.decoding.step_uncertainty import EnsembleStepUncertainty

    rows = members.shape[1]
    measures = EnsembleStepUncertainty(members.shape[0])
    measures.step(list(members), torch.full((rows, 1), 2), eos=2)
    measures.reorder(order)
    return measures.step(list(members.flip(1)), torch.tensor([2, 3]).repeat(rows, 1), eos=2)


def extreme_members(m, k):
    """M members' log-probabilities (4, K): row 0 with a class member 0 rules out (-inf), row 1 a class every
    member rules out, row 2 from logits of scale 1e4 (log-probabilities down to -1e5, probabilities 0 or 1),
    row 3 plain."""
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(m, 4, k, generator=g) * 3.0
    logits[0, 0, 1] = float("-inf")
    logits[:, 1, 2] = float("-inf")
    logits[:, 2] *= 1e4
    return logits.log_softmax(-1)


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("rows, k, block", [(5, 37, 1024), (4, 300, 128), (1, 50, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_in_beam_ensemble_columns_match_torch_path(use, monkeypatch, m, rows, k, block, dtype):
    """Against the float64 torch path on the same (half-precision) values: within 1e-5 relative, or no further
    than twice the float32 torch path's own error (MI, EPKL and MKL are differences of entropies)."""
    monkeypatch.setattr(triton_stats, "MAX_BLOCK", block)
    members = (torch.randn(m, rows, k, generator=torch.Generator().manual_seed(k)) * 3.0).log_softmax(-1).to(dtype)
    order = torch.arange(rows).flip(0)
    use("triton")
    got = ensemble_step_columns(members, order)
    use("torch")
    single = ensemble_step_columns(members, order)
    exact = ensemble_step_columns(members.double(), order)
    assert got.dtype == single.dtype == torch.float32 and got.shape == single.shape == (rows, 9 + 2 * m)
    assert_within(got, exact, rtol=0.0, atol=torch.maximum(1e-5 * exact.abs(), 2 * (single.double() - exact).abs()
                                                            .amax(0)))
    if m == 1:  # one member: exactly no disagreement, PE or EP
        assert torch.equal(got[:, [2, 3, 4, 6, 7, 8]], torch.zeros(rows, 6))


@pytest.mark.parametrize("m", [1, 5])
def test_in_beam_ensemble_columns_of_extreme_log_probabilities(use, m):
    """-inf entries and log-probabilities of -1e5: the same values as the float32 torch path (infinite where
    it is: a class that only some members rule out makes -sum pbar mlog +inf); the EP cross-entropy clamps
    mlog at float32's lowest value on both paths."""
    members = extreme_members(m, 45)
    order = torch.tensor([1, 0, 3, 2])
    use("triton")
    got = ensemble_step_columns(members, order)
    use("torch")
    want = ensemble_step_columns(members, order)
    # the second step sees the rows reversed: row 3 has the class only member 0 rules out; the chosen
    # log p(EOS) of row 2 (row 1 reversed) is -inf
    assert torch.isfinite(want[:3, :9]).all() and torch.isfinite(got[:3, :9]).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_in_beam_ensemble_columns_of_an_empty_beam(use):
    use("triton")
    members = torch.zeros(3, 0, 11)
    assert ensemble_step_columns(members, torch.zeros(0, dtype=torch.long)).shape == (0, 9 + 2 * 3)
