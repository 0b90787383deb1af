"""Streamed ensemble statistics against brute force over a stacked (M, N, K) ensemble, and the proxy precision."""
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from fairseq_pdd.distill import dirichlet
from fairseq_pdd.distill.ensemble_stats import EnsembleAccumulator, Workspace, ensemble_statistics


def member_log_probs(m, n=4, k=50, seed=0, scale=3.0):
    """(M, N, K) float32 log-probabilities of M members: log-softmax of random logits."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, n, k, generator=g) * scale).log_softmax(-1)


def brute_force(log_probs):
    """Every statistic of DESIGN.md section 2 in float64 from the whole (M, N, K) stack."""
    log_probs = log_probs.double()
    members = Categorical(logits=log_probs)
    pbar = log_probs.exp().mean(0)
    mean = Categorical(probs=pbar)
    mlog = log_probs.mean(0)
    expected_entropy = members.entropy().mean(0)
    entropy_of_expected = mean.entropy()
    return dict(
        mean_probs=pbar,
        mean_log_probs=mlog,
        expected_entropy=expected_entropy,
        entropy_of_expected=entropy_of_expected,
        mutual_information=entropy_of_expected - expected_entropy,
        epkl=-(pbar * mlog).sum(-1) - expected_entropy,
        mkl=torch.stack([kl_divergence(mean, Categorical(logits=lp)) for lp in log_probs]).mean(0),
    )


def streamed(stats):
    return dict(
        mean_probs=stats.mean_probs,
        mean_log_probs=stats.mean_log_probs,
        expected_entropy=stats.expected_entropy,
        entropy_of_expected=stats.entropy_of_expected,
        mutual_information=stats.mutual_information,
        epkl=stats.epkl,
        mkl=stats.mkl,
    )


def assert_statistics_close(got, want, atol=2e-5):
    for key, value in want.items():
        torch.testing.assert_close(got[key].double(), value, rtol=1e-5, atol=atol, msg=lambda m: f"{key}: {m}")


def test_shared_workspace_gives_the_same_statistics_and_reuses_its_buffers():
    """Accumulators of one workspace (as beam search's steps, whose rows shrink) equal fresh ones, while
    the second writes into the first one's storage."""
    workspace = Workspace()
    pointers = []
    for n, seed in ((6, 1), (4, 2), (6, 3)):
        log_probs = member_log_probs(3, n=n, k=20, seed=seed)
        acc = EnsembleAccumulator(workspace)
        for member in log_probs:
            acc.add(member)
        stats = acc.finalize()
        pointers.append(stats.mean_probs.data_ptr())
        assert_statistics_close(streamed(stats), brute_force(log_probs))
    assert pointers[0] == pointers[1] == pointers[2]


@pytest.mark.parametrize("k", [7, 1000])
@pytest.mark.parametrize("m", [1, 2, 5])
def test_streamed_statistics_match_brute_force(m, k):
    log_probs = member_log_probs(m, k=k, seed=m)
    stats = ensemble_statistics(iter(log_probs))
    assert stats.num_models == m and stats.num_classes == k
    assert stats.mean_probs.dtype == torch.float32 and stats.mean_log_probs.dtype == torch.float32
    assert_statistics_close(streamed(stats), brute_force(log_probs))


def test_accumulator_adds_members_one_at_a_time():
    log_probs = member_log_probs(4, seed=1)
    acc = EnsembleAccumulator()
    for member in log_probs:
        acc.add(member)
    assert_statistics_close(streamed(acc.finalize()), brute_force(log_probs))


def test_members_are_not_modified():
    log_probs = member_log_probs(3, seed=2)
    before = log_probs.clone()
    stats = ensemble_statistics(list(log_probs))
    assert torch.equal(log_probs, before)
    assert not any(stats.mean_log_probs.data_ptr() == lp.data_ptr() for lp in log_probs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_members_are_accumulated_in_float32(dtype):
    log_probs = member_log_probs(3, seed=3).to(dtype)
    stats = streamed(ensemble_statistics(log_probs))
    want = streamed(ensemble_statistics(log_probs.float()))
    for key, value in want.items():
        assert stats[key].dtype == torch.float32, key
        assert torch.equal(stats[key], value), key


def test_single_member_has_no_disagreement():
    log_probs = member_log_probs(1, k=1000, seed=4)
    stats = ensemble_statistics(log_probs)
    for disagreement in (stats.mutual_information, stats.mkl, stats.epkl):
        torch.testing.assert_close(disagreement, torch.zeros_like(disagreement), rtol=0, atol=1e-5)
    torch.testing.assert_close(stats.entropy_of_expected, stats.expected_entropy)


@pytest.mark.parametrize("m", [2, 5])
def test_epkl_is_the_mean_kl_over_all_ordered_pairs(m):
    """EPKL = (1/M^2) sum_{m, m'} KL(p_m || p_m') (self-pairs included) = (M-1)/M * mean over m != m'."""
    log_probs = member_log_probs(m, seed=5).double()
    pairs = torch.stack(
        [
            kl_divergence(Categorical(logits=log_probs[i]), Categorical(logits=log_probs[j]))
            for i in range(m)
            for j in range(m)
            if i != j
        ]
    )
    stats = ensemble_statistics(log_probs.float())
    torch.testing.assert_close(stats.epkl.double(), pairs.sum(0) / m**2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.epkl.double(), pairs.mean(0) * (m - 1) / m, rtol=1e-5, atol=1e-5)


def test_disagreement_ordering():
    """0 <= MI <= EPKL, and MKL >= 0, for any ensemble (Jensen)."""
    stats = ensemble_statistics(member_log_probs(5, seed=6))
    assert (stats.mutual_information >= -1e-6).all()
    assert (stats.epkl >= stats.mutual_information - 1e-6).all()
    assert (stats.mkl >= -1e-6).all()
    assert (stats.mutual_information > 1e-2).all()


def test_shape_mismatch_raises():
    acc = EnsembleAccumulator()
    acc.add(torch.zeros(3, 5).log_softmax(-1))
    with pytest.raises(ValueError, match=r"member 1 .*\(3, 6\).*\(3, 5\)"):
        acc.add(torch.zeros(3, 6).log_softmax(-1))


@pytest.mark.parametrize("members", [[], iter(())])
def test_no_members_raises(members):
    with pytest.raises(ValueError, match="no ensemble member"):
        ensemble_statistics(members)


def test_finalize_without_members_raises():
    with pytest.raises(ValueError, match="no ensemble member"):
        EnsembleAccumulator().finalize()


@pytest.mark.parametrize("mode", dirichlet.TARGET_CONCENTRATIONS)
def test_proxy_precision_formula(mode):
    stats = ensemble_statistics(member_log_probs(5, k=50, seed=7))
    k = stats.num_classes
    beta0 = dirichlet.proxy_precision(stats.mkl, stats.epkl, k, mode)
    disagreement = 2 * stats.mkl if mode == "mkl" else stats.epkl
    torch.testing.assert_close(beta0, (k - 1) / (disagreement + dirichlet.EPS_LOSS), rtol=1e-6, atol=0)
    assert beta0.shape == stats.mkl.shape and (beta0 > 0).all()


@pytest.mark.parametrize("mode", dirichlet.TARGET_CONCENTRATIONS)
def test_proxy_precision_without_disagreement_is_finite(mode):
    zero = torch.zeros(3)
    beta0 = dirichlet.proxy_precision(zero, zero, 10, mode)
    torch.testing.assert_close(beta0, torch.full((3,), 9 / dirichlet.EPS_LOSS))


@pytest.mark.parametrize("mode", dirichlet.TARGET_CONCENTRATIONS)
def test_proxy_precision_cap(mode):
    """--max-target-precision C: min(beta0, C) elementwise; 0 leaves beta0 as it is; a negative cap is refused."""
    stats = ensemble_statistics(member_log_probs(5, k=50, seed=7))
    k = stats.num_classes
    beta0 = dirichlet.proxy_precision(stats.mkl, stats.epkl, k, mode)
    cap = float(beta0.median())
    capped = dirichlet.proxy_precision(stats.mkl, stats.epkl, k, mode, max_precision=cap)
    torch.testing.assert_close(capped, torch.where(beta0 > cap, torch.full_like(beta0, cap), beta0), rtol=0, atol=0)
    assert (capped < beta0).any() and (capped == beta0).any()
    torch.testing.assert_close(dirichlet.proxy_precision(stats.mkl, stats.epkl, k, mode, 0.0), beta0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="must be >= 0"):
        dirichlet.proxy_precision(stats.mkl, stats.epkl, k, mode, -1.0)


def test_agreeing_members_give_non_negative_disagreement():
    """float32 rounding must not make MKL/EPKL/MI negative (a negative MKL flips the proxy precision)."""
    member = torch.log_softmax(torch.randn(2000, 800, generator=torch.Generator().manual_seed(0)) * 5, -1)
    stats = ensemble_statistics([member, member.clone()])
    for value in (stats.mkl, stats.epkl, stats.mutual_information):
        assert (value >= 0).all()
    assert (dirichlet.proxy_precision(stats.mkl, stats.epkl, 800, "mkl") > 0).all()


def test_one_member_has_exactly_zero_disagreement():
    """M = 1: MI, EPKL, MKL (and the EP variants) are exactly 0, not float32 rounding noise whose ranking
    would give meaningless OOD / error-detection scores."""
    from fairseq_pdd.decoding.uncertainty import EnsembleHypothesisAccumulator

    g = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(3, 5, 50, generator=g) * 4, -1)
    tokens = torch.randint(0, 50, (3, 5), generator=g)
    acc = EnsembleHypothesisAccumulator(tokens, torch.ones(3, 5, dtype=torch.bool))
    acc.add(log_probs)
    token, sequence = acc.measures()
    for key in ("mutual_information", "epkl", "mkl", "ep_mutual_information", "ep_epkl", "ep_mkl"):
        assert torch.equal(token[key], torch.zeros(3, 5)), key
        assert torch.equal(sequence[key], torch.zeros(3, dtype=sequence[key].dtype)), key
    assert token["total_uncertainty"].gt(0).all()


def test_a_class_every_member_rules_out_adds_nothing():
    """p_k = 0 for every member (log-probability -inf, as fp16 teachers give for far-off classes): the
    statistics are those of the ensemble without that class (0 log 0 = 0), not NaN."""
    log_probs = member_log_probs(3, n=1, k=20, seed=4)
    logits = log_probs.clone()
    logits[:, 0, 7] = float("-inf")
    ruled_out = logits.log_softmax(-1)
    kept = torch.cat([ruled_out[..., :7], ruled_out[..., 8:]], -1)
    got = streamed(ensemble_statistics(iter(ruled_out)))
    want = brute_force(kept)
    for key in ("expected_entropy", "entropy_of_expected", "mutual_information", "epkl", "mkl"):
        assert torch.isfinite(got[key]).all(), key
        torch.testing.assert_close(got[key].double(), want[key], rtol=1e-5, atol=2e-5, msg=key)


@pytest.mark.parametrize("m", [1, 3])
def test_weighted_mixture_matches_brute_force(m):
    """With per-row weights w (N, M): H[q] and -sum_k q_k mlog_k of q = sum_m w_m p_m, from the stack."""
    log_probs = member_log_probs(m, n=5, k=30, seed=7)
    weights = torch.softmax(torch.randn(5, m, generator=torch.Generator().manual_seed(8)), -1)
    acc = EnsembleAccumulator()
    for member, weight in zip(log_probs, weights.t()):
        assert acc.add(member, return_probs=False, weight=weight) is None
    stats = acc.finalize()
    q = torch.einsum("nm,mnk->nk", weights.double(), log_probs.double().exp())
    want_entropy = Categorical(probs=q).entropy()
    want_cross = -(q * brute_force(log_probs)["mean_log_probs"]).sum(-1)
    torch.testing.assert_close(stats.mixture_entropy.double(), want_entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.mixture_cross_entropy.double(), want_cross, rtol=1e-5, atol=1e-6)
    assert_statistics_close(streamed(stats), brute_force(log_probs))
    assert ensemble_statistics(iter(log_probs)).mixture_entropy is None


def test_mixture_weights_for_some_members_only_raise():
    log_probs = member_log_probs(2, n=3, k=5)
    acc = EnsembleAccumulator()
    acc.add(log_probs[0], weight=torch.ones(3))
    with pytest.raises(ValueError, match="member 1 is added without a mixture weight, unlike the first"):
        acc.add(log_probs[1])
    acc = EnsembleAccumulator()
    acc.add(log_probs[0])
    with pytest.raises(ValueError, match="member 1 is added with a mixture weight, unlike the first"):
        acc.add(log_probs[1], weight=torch.ones(3))
    with pytest.raises(ValueError, match=r"mixture weight of shape \(4,\) .* expected \(3,\)"):
        EnsembleAccumulator().add(log_probs[0], weight=torch.ones(4))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_statistics_from_logits_match_brute_force_at_temperature(temperature, dtype):
    """``add_logits(z, T)`` gives the statistics of the members ``softmax(z / T)``, from the logits as the model
    produced them (half precision upcast before the division), and leaves the logits as they were."""
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(3, 6, 40, generator=g) * 4.0).to(dtype)
    before = logits.clone()
    weights = torch.softmax(torch.randn(6, 3, generator=g), -1)
    acc = EnsembleAccumulator()
    for member, weight in zip(logits, weights.t()):
        finite = acc.add_logits(member, temperature, weight=weight)
        assert finite.dtype == torch.bool and finite.shape == (6,) and finite.all()
    stats = acc.finalize()
    assert torch.equal(logits, before)
    log_probs = (logits.double() / temperature).log_softmax(-1)
    assert_statistics_close(streamed(stats), brute_force(log_probs))
    q = torch.einsum("nm,mnk->nk", weights.double(), log_probs.exp())
    torch.testing.assert_close(stats.mixture_entropy.double(), Categorical(probs=q).entropy(), rtol=1e-5, atol=1e-6)


def test_logits_report_rows_with_non_finite_log_probabilities():
    """-inf logits (a masked class) give probability 0 and finite statistics but are reported, as are NaN and
    +inf logits; the empty batch gives empty flags."""
    logits = member_log_probs(2, n=4, k=9, seed=12)
    logits[0, 1, 3] = float("-inf")
    logits[1, 2, 0] = float("nan")
    logits[1, 3, 5] = float("inf")
    acc = EnsembleAccumulator()
    assert acc.add_logits(logits[0]).tolist() == [True, False, True, True]
    assert acc.add_logits(logits[1], temperature=0.5).tolist() == [True, True, False, False]
    stats = acc.finalize()
    assert torch.isfinite(stats.expected_entropy[:2]).all() and torch.isnan(stats.expected_entropy[2:]).all()
    acc = EnsembleAccumulator()
    assert acc.add_logits(torch.zeros(0, 9)).shape == (0,)
    assert acc.finalize().mean_probs.shape == (0, 9)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_logits_with_a_bad_temperature_raise(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        EnsembleAccumulator().add_logits(torch.zeros(2, 3), temperature)
