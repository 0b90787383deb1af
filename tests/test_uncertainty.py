"""Uncertainty measures: Dirichlet closed forms vs Monte-Carlo, ensemble measures vs brute force over
stacked members, sequence / PE-EP / n-best aggregation vs explicit loops, name tables, bad inputs."""
import ast
import math

import pytest
import torch
from torch.distributions import Categorical, Dirichlet, kl_divergence

from fairseq_pdd.decoding import uncertainty as U
from fairseq_pdd.distill.ensemble_stats import ensemble_statistics

# ---------------------------------------------------------------------------------------------
# Dirichlet: closed forms


def direct_dirichlet(alpha):
    """The formulas of DESIGN.md section 5 written out naively in float64 (the reference)."""
    a = alpha.double()
    a0 = a.sum(-1, keepdim=True)
    phat = a / a0
    total = -(phat * phat.log()).sum(-1)
    data = -(phat * (torch.digamma(a + 1) - torch.digamma(a0 + 1))).sum(-1)
    return dict(
        total_uncertainty=total,
        data_uncertainty=data,
        mutual_information=total - data,
        epkl=(a.shape[-1] - 1) / a0.squeeze(-1),
        mkl=(phat * (phat.log() - torch.digamma(a) + torch.digamma(a0))).sum(-1),
    )


MC_ALPHAS = [
    [0.5, 1.0, 2.0, 3.0, 5.0],
    [3.0] * 6,
    [20.0, 0.7, 0.7],
]


@pytest.mark.parametrize("alpha", MC_ALPHAS)
def test_dirichlet_measures_match_monte_carlo(alpha):
    """Each closed form is the expectation it claims to be, within 5 Monte-Carlo standard errors.

    * data_uncertainty   = E_pi H[pi]
    * mutual_information = H[E pi] - E H[pi] = E_pi KL(pi || phat)
    * mkl                = E_pi KL(phat || pi)        (not E KL(pi || phat): that one is the MI)
    * epkl               = E_{pi, pi' iid} KL(pi || pi') = (K - 1) / a0
    With n = 200k draws the standard error is std/450; for a correct closed form a miss beyond 5 SE has
    probability ~6e-7 for a random seed (the seed is fixed, so the test is deterministic anyway). The
    closed forms are evaluated in float32, hence the 1e-5 absolute slack.
    """
    alpha = torch.tensor(alpha, dtype=torch.float64)
    n = 200_000
    torch.manual_seed(0)
    pi, pi2 = Dirichlet(alpha).sample((n,)), Dirichlet(alpha).sample((n,))
    phat = alpha / alpha.sum()
    samples = dict(
        data_uncertainty=-torch.xlogy(pi, pi).sum(-1),
        mutual_information=(pi * (pi.log() - phat.log())).sum(-1),
        mkl=(phat * (phat.log() - pi.log())).sum(-1),
        epkl=(pi * (pi.log() - pi2.log())).sum(-1),
    )
    got = U.dirichlet_token_measures(alpha.float())
    for key, s in samples.items():
        se = s.std().item() / math.sqrt(n)
        assert abs(got[key].item() - s.mean().item()) <= 5 * se + 1e-5, (key, got[key].item(), s.mean().item(), se)
    # and H[E pi] - E H[pi] for the MI, with the MC data uncertainty
    mi_from_entropies = -(phat * phat.log()).sum() - samples["data_uncertainty"].mean()
    se = samples["data_uncertainty"].std().item() / math.sqrt(n)
    assert abs(got["mutual_information"].item() - mi_from_entropies.item()) <= 5 * se + 1e-5
    # the identities that tie them together
    torch.testing.assert_close(got["epkl"], got["mutual_information"] + got["mkl"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["total_uncertainty"].double(), -(phat * phat.log()).sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3, 1e6, 1e8])
@pytest.mark.parametrize("k", [3, 1000])
def test_dirichlet_measures_match_float64_formulas_at_every_precision(scale, k):
    """float32 results within 1e-4 relative of the float64 formulas, also at precisions of 1e8 where the
    naive float32 MI (total - data) has no correct digit (relative error ~1e4)."""
    g = torch.Generator().manual_seed(k)
    alpha = (torch.randn(50, k, generator=g) * 2).exp() * scale
    got = U.dirichlet_token_measures(alpha)
    for key, want in direct_dirichlet(alpha).items():
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key].double(), want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_dirichlet_measures_of_float64_input_stay_float64_and_half_is_upcast():
    alpha = torch.rand(4, 9, dtype=torch.float64) * 5 + 0.1
    got = U.dirichlet_token_measures(alpha)
    for key, want in direct_dirichlet(alpha).items():
        assert got[key].dtype == torch.float64
        torch.testing.assert_close(got[key], want, rtol=1e-9, atol=1e-12)
    half = U.dirichlet_token_measures(alpha.half())
    assert all(v.dtype == torch.float32 for v in half.values())


EXTREMES = [
    torch.full((5, 40000), 1e8),  # huge precision: MI ~ 2e-4
    torch.cat([torch.full((3, 1), 1e15), torch.full((3, 999), math.exp(-30.0))], -1),  # one-hot
    torch.full((2, 1000), math.exp(-30.0)),  # dirichlet.ALPHA_MIN everywhere
    torch.tensor([[1e-30, 1e30, 1.0, 7.99, 8.0, 8.01]]),
    torch.exp(torch.randn(64, 300, generator=torch.Generator().manual_seed(1)) * 12).clamp(1e-13, 1e15),
]


@pytest.mark.parametrize("alpha", EXTREMES, ids=range(len(EXTREMES)))
def test_dirichlet_measures_are_finite_and_ordered_at_extremes(alpha):
    """0 <= data <= total, 0 <= MI <= MKL (h - g decreases) and MKL <= EPKL, always; MI >= 0 is the sign
    the authors' code got wrong."""
    got = U.dirichlet_token_measures(alpha, tokens=torch.zeros(alpha.shape[:-1], dtype=torch.long))
    for key, value in got.items():
        assert torch.isfinite(value).all(), key
    assert (got["mutual_information"] >= 0).all()
    assert (got["data_uncertainty"] >= 0).all()
    assert (got["total_uncertainty"] >= got["data_uncertainty"]).all()
    assert (got["mkl"] >= got["mutual_information"] * (1 - 1e-5)).all()
    assert (got["mkl"] <= got["epkl"]).all()
    assert (got["nll_mkl"] >= 0).all() and (got["expected_nll"] >= got["nll"]).all()


def test_dirichlet_huge_precision_mi_is_accurate():
    """All alpha equal to c: MI = psi(c + 1) - log c - (psi(Kc + 1) - log(Kc)) ~ (K - 1) / (2 K c)."""
    k, c = 40000, 1e8
    got = U.dirichlet_token_measures(torch.full((1, k), c))
    want = (k - 1) / (2 * k * c) - (1 / (12 * c**2)) * (1 - 1 / k**2)
    assert got["mutual_information"].item() == pytest.approx(want, rel=1e-5)
    assert got["total_uncertainty"].item() == pytest.approx(math.log(k), rel=1e-6)


def test_dirichlet_chosen_token_measures():
    """nll = -log phat_y, expected_nll = E_pi[-log pi_y] = psi(a0) - psi(alpha_y) (checked by MC too)."""
    g = torch.Generator().manual_seed(2)
    alpha = torch.rand(3, 4, 11, generator=g, dtype=torch.float64) * 4 + 0.2
    tokens = torch.randint(0, 11, (3, 4), generator=g)
    got = U.dirichlet_token_measures(alpha, tokens)
    a_y = alpha.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    a0 = alpha.sum(-1)
    torch.testing.assert_close(got["nll"], a0.log() - a_y.log())
    torch.testing.assert_close(got["expected_nll"], torch.digamma(a0) - torch.digamma(a_y))
    torch.testing.assert_close(got["nll_mkl"], got["expected_nll"] - got["nll"])
    torch.manual_seed(3)
    one = alpha[0, 0]
    pi_y = Dirichlet(one).sample((200_000,))[:, tokens[0, 0]]
    s = -pi_y.log()
    assert abs(got["expected_nll"][0, 0].item() - s.mean().item()) <= 5 * s.std().item() / math.sqrt(len(s))


def test_dirichlet_chunking_does_not_change_results(monkeypatch):
    alpha = torch.rand(7, 5, 13, generator=torch.Generator().manual_seed(4)) * 3 + 0.1
    tokens = torch.randint(0, 13, (7, 5))
    whole = U.dirichlet_token_measures(alpha, tokens)
    monkeypatch.setattr(U, "CHUNK_ELEMENTS", 13 * 3)  # 3 rows a chunk, last chunk partial
    chunked = U.dirichlet_token_measures(alpha, tokens)
    for key in whole:
        assert chunked[key].shape == (7, 5)
        torch.testing.assert_close(chunked[key], whole[key], rtol=0, atol=0)


def test_dirichlet_hypothesis_measures_vs_loops():
    g = torch.Generator().manual_seed(5)
    b, t, k = 3, 6, 8
    alpha = torch.rand(b, t, k, generator=g) * 3 + 0.05
    tokens = torch.randint(0, k, (b, t), generator=g)
    lengths = [6, 2, 1]
    mask = torch.arange(t) < torch.tensor(lengths).unsqueeze(-1)
    alpha[~mask] = float("nan")  # garbage at padding must not leak in
    token, seq = U.dirichlet_hypothesis_measures(alpha, tokens, mask)  # NaN at padding is fine
    assert set(token) == set(U.DIRICHLET_TOKEN_KEYS + U.TARGET_KEYS)
    assert set(seq) == set(token) | {"log_prob", "score"}
    for i, n in enumerate(lengths):
        ref = U.dirichlet_token_measures(alpha[i, :n], tokens[i, :n])
        for key in token:
            torch.testing.assert_close(token[key][i, :n], ref[key])
            assert (token[key][i, n:] == 0).all()
            torch.testing.assert_close(seq[key][i], ref[key].mean(), rtol=1e-6, atol=1e-6)
        phat_y = [alpha[i, j, tokens[i, j]] / alpha[i, j].sum() for j in range(n)]
        log_prob = sum(math.log(p.item()) for p in phat_y)
        assert seq["log_prob"][i].item() == pytest.approx(log_prob, rel=1e-5)
        assert seq["score"][i].item() == pytest.approx(log_prob / n, rel=1e-5)
        assert seq["nll"][i].item() == pytest.approx(-log_prob / n, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Ensembles: brute force over stacked members (the test only)


def ensemble_case(m=3, b=3, t=5, k=7, lengths=(5, 3, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    log_probs = (torch.randn(m, b, t, k, generator=g) * 2).log_softmax(-1)
    tokens = torch.randint(0, k, (b, t), generator=g)
    mask = torch.arange(t) < torch.tensor(lengths).unsqueeze(-1)
    return log_probs, tokens, mask, list(lengths)


def brute_force_ensemble(log_probs, tokens, lengths):
    """Every token and sequence measure by explicit loops in float64 over the stacked (M, B, T, K)."""
    lp = log_probs.double()
    m = lp.shape[0]
    token, seq = [], []
    for i, n in enumerate(lengths):
        rows = {}
        member_prefix = [1.0] * m  # P_m(y_<t)
        for j in range(n):
            p = lp[:, i, j].exp()  # (M, K)
            y = tokens[i, j].item()
            pbar = p.mean(0)
            mlog = lp[:, i, j].mean(0)
            eh = Categorical(probs=p).entropy().mean()
            h = Categorical(probs=pbar).entropy()
            w = torch.tensor(member_prefix, dtype=torch.float64)
            w = w / w.sum()
            q = (w.unsqueeze(-1) * p).sum(0)
            hq = Categorical(probs=q).entropy()
            pe = pbar[y].item()
            ep = q[y].item()
            expected_nll = -mlog[y].item()
            values = dict(
                total_uncertainty=h,
                data_uncertainty=eh,
                mutual_information=h - eh,
                epkl=-(pbar * mlog).sum() - eh,
                mkl=torch.stack([kl_divergence(Categorical(probs=pbar), Categorical(probs=pm)) for pm in p]).mean(),
                ep_total_uncertainty=hq,
                ep_mutual_information=hq - eh,
                ep_epkl=-(q * mlog).sum() - eh,
                ep_mkl=torch.stack([kl_divergence(Categorical(probs=q), Categorical(probs=pm)) for pm in p]).mean(),
                nll=-math.log(pe),
                expected_nll=expected_nll,
                nll_mkl=expected_nll + math.log(pe),
                ep_nll=-math.log(ep),
                ep_nll_mkl=expected_nll + math.log(ep),
            )
            for key, v in values.items():
                rows.setdefault(key, []).append(float(v))
            member_prefix = [member_prefix[r] * p[r, y].item() for r in range(m)]
        token.append(rows)
        s = {key: sum(v) / n for key, v in rows.items()}
        member_seq = torch.tensor([sum(lp[r, i, j, tokens[i, j]].item() for j in range(n)) for r in range(m)],
                                  dtype=torch.float64)
        s["log_prob"] = -sum(rows["nll"])
        s["score"] = s["log_prob"] / n
        s["ep_log_prob"] = math.log(sum(member_seq.exp().tolist()) / m)
        x = member_seq / n
        s["var"] = x.exp().var(unbiased=False).item()
        s["logvar"] = x.var(unbiased=False).item()
        s["var_combo"] = s["var"] / (1e-10 + math.exp(s["ep_log_prob"] / n)) - 1
        s["logvar_combo"] = s["logvar"] / (1e-10 + x.mean().item()) - 1
        seq.append(s)
    return token, seq


def assert_matches_brute_force(token, seq, want_token, want_seq, lengths, ep_tokens=True):
    for i, n in enumerate(lengths):
        for key, values in want_token[i].items():
            if key in U.EP_TOKEN_KEYS and not ep_tokens:
                continue
            got = token[key][i, :n].double()
            torch.testing.assert_close(got, torch.tensor(values, dtype=torch.float64), rtol=1e-5, atol=2e-6,
                                       msg=lambda msg: f"token {key}, hypothesis {i}: {msg}")
            assert (token[key][i, n:] == 0).all(), key
        for key, value in want_seq[i].items():
            if key in U.EP_TOKEN_KEYS and not ep_tokens:
                continue
            assert seq[key][i].item() == pytest.approx(value, rel=1e-5, abs=2e-6), (key, i)


def test_ensemble_hypothesis_measures_match_brute_force():
    log_probs, tokens, mask, lengths = ensemble_case()
    want_token, want_seq = brute_force_ensemble(log_probs, tokens, lengths)
    acc = U.EnsembleHypothesisAccumulator(tokens, mask)
    for member in log_probs:
        acc.add(member)
    token, seq = acc.measures()
    keys = U.DIRICHLET_TOKEN_KEYS + U.TARGET_KEYS + U.EP_TOKEN_KEYS + U.EP_TARGET_KEYS
    assert set(token) == set(keys)
    assert set(seq) == set(keys) | {"log_prob", "score"} | set(U.ENSEMBLE_SEQUENCE_KEYS)
    assert all(v.dtype == torch.float32 for v in list(token.values()) + list(seq.values()))
    assert_matches_brute_force(token, seq, want_token, want_seq, lengths)


def test_functional_path_equals_accumulator_and_works_without_ep():
    log_probs, tokens, mask, lengths = ensemble_case(m=4, seed=1)
    want_token, want_seq = brute_force_ensemble(log_probs, tokens, lengths)
    stats = ensemble_statistics(log_probs)  # (B, T) statistics from (B, T, K) members
    chosen = log_probs.gather(-1, tokens.expand(4, -1, -1).unsqueeze(-1)).squeeze(-1)  # (M, B, T)
    token, seq = U.ensemble_hypothesis_measures(stats, chosen, mask)
    assert not set(U.EP_TOKEN_KEYS) & set(token)
    assert_matches_brute_force(token, seq, want_token, want_seq, lengths, ep_tokens=False)
    acc = U.EnsembleHypothesisAccumulator(tokens, mask, expectation_of_products=False)
    for member in log_probs:
        acc.add(member)
    token2, seq2 = acc.measures()
    for key in token:
        torch.testing.assert_close(token2[key], token[key])
    for key in seq:
        torch.testing.assert_close(seq2[key], seq[key])


def test_pe_ep_identities():
    """sum_t ep_nll = -log mean_m P_m(y) (telescoping), EP = PE at the first token, and both sMKLs >= 0:
    nll_mkl = (log P_PE - mean_m log P_m) / L and ep_nll_mkl = (log P_EP - mean_m log P_m) / L (Jensen)."""
    log_probs, tokens, mask, lengths = ensemble_case(m=5, b=4, t=9, k=30, lengths=(9, 7, 4, 1), seed=2)
    chosen = log_probs.gather(-1, tokens.expand(5, -1, -1).unsqueeze(-1)).squeeze(-1)
    token = U.ensemble_target_measures(chosen, mask)
    seq = U.ensemble_sequence_measures(chosen, mask)
    length = torch.tensor(lengths, dtype=torch.float32)
    torch.testing.assert_close(token["ep_nll"].sum(-1), -seq["ep_log_prob"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(token["ep_nll"][:, 0], token["nll"][:, 0])
    member_seq = torch.where(mask, chosen, torch.zeros_like(chosen)).sum(-1)
    torch.testing.assert_close(seq["ep_log_prob"], member_seq.logsumexp(0) - math.log(5))
    sdu = token["expected_nll"].sum(-1) / length
    torch.testing.assert_close(sdu, -member_seq.mean(0) / length)
    assert (token["ep_nll_mkl"].sum(-1) >= -1e-5).all()
    assert (token["nll_mkl"] >= 0).all()
    # the EP log-likelihood is at least the mean member log-likelihood; PE - EP gap = ep_sTU - pe_sTU
    torch.testing.assert_close((token["ep_nll_mkl"] - token["nll_mkl"]).sum(-1),
                               token["nll"].sum(-1) - token["ep_nll"].sum(-1), rtol=1e-5, atol=1e-5)


def test_ensemble_padding_garbage_is_ignored():
    log_probs, tokens, mask, lengths = ensemble_case(seed=3)
    clean = U.EnsembleHypothesisAccumulator(tokens, mask)
    dirty = U.EnsembleHypothesisAccumulator(tokens, mask)
    for member in log_probs:
        clean.add(member)
        noisy = member.clone()
        noisy[~mask] = float("nan")
        dirty.add(noisy)
    (t1, s1), (t2, s2) = clean.measures(), dirty.measures()
    for key in t1:
        torch.testing.assert_close(t2[key], t1[key], msg=key)
    for key in s1:
        torch.testing.assert_close(s2[key], s1[key], msg=key)


def test_zero_probability_chosen_token_keeps_weights_defined():
    log_probs, tokens, mask, _ = ensemble_case(seed=4)
    log_probs[0, 0, 0, tokens[0, 0]] = -math.inf  # member 0 rules out the first token of hypothesis 0
    acc = U.EnsembleHypothesisAccumulator(tokens, mask)
    for member in log_probs:
        acc.add(member)
    token, seq = acc.measures()
    assert all(not torch.isnan(v).any() for v in list(token.values()) + list(seq.values()))
    # after its zero, member 0 carries no EP weight: EP at t=1 uses members 1 and 2 only
    p = log_probs[1:, 0, 1].exp()
    w = log_probs[1:, 0, 0, tokens[0, 0]].exp()
    q = (w.unsqueeze(-1) * p).sum(0) / w.sum()
    assert token["ep_nll"][0, 1].item() == pytest.approx(-math.log(q[tokens[0, 1]].item()), rel=1e-5)


def test_single_member_ensemble_has_no_disagreement():
    log_probs, tokens, mask, _ = ensemble_case(m=1, seed=5)
    acc = U.EnsembleHypothesisAccumulator(tokens, mask)
    acc.add(log_probs[0])
    token, seq = acc.measures()
    for key in ("mutual_information", "epkl", "mkl", "nll_mkl", "ep_nll_mkl", "ep_mkl"):
        assert token[key].abs().max() < 1e-5, key
    for key in ("var", "logvar"):
        assert seq[key].abs().max() < 1e-6, key
    torch.testing.assert_close(seq["ep_log_prob"], seq["log_prob"])


# ---------------------------------------------------------------------------------------------
# Sequence and n-best aggregation


def test_sequence_measures_vs_loops():
    g = torch.Generator().manual_seed(6)
    u = torch.randn(4, 6, generator=g)
    lp = -torch.rand(4, 6, generator=g)
    lengths = [6, 4, 2, 1]
    mask = torch.arange(6) < torch.tensor(lengths).unsqueeze(-1)
    u[~mask] = float("nan")
    lp[~mask] = float("inf")
    out = U.sequence_measures({"u": u, "half": u.half()}, mask, lp)
    assert out["half"].dtype == torch.float32
    for i, n in enumerate(lengths):
        assert out["u"][i].item() == pytest.approx(sum(u[i, :n].tolist()) / n, rel=1e-6)
        assert out["log_prob"][i].item() == pytest.approx(sum(lp[i, :n].tolist()), rel=1e-6)
        assert out["score"][i].item() == pytest.approx(sum(lp[i, :n].tolist()) / n, rel=1e-6)


def test_nbest_weighting_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, 99.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, float("nan")]])
    e = [math.exp(-1), math.exp(-2), math.exp(-3)]
    bs0 = (1 * e[0] + 2 * e[1] + 3 * e[2]) / sum(e)
    bs1 = (10 * math.exp(-0.5) + 20 * math.exp(-4)) / (math.exp(-0.5) + math.exp(-4))
    got = U.nbest_aggregate(values, lp, mask, "bs")
    assert got.tolist() == pytest.approx([bs0, bs1], rel=1e-6)
    t = 2.0
    e2 = [math.exp(-1 / t), math.exp(-2 / t), math.exp(-3 / t)]
    got = U.nbest_aggregate(values, lp, mask, "bs", temperature=t)
    assert got[0].item() == pytest.approx((e2[0] + 2 * e2[1] + 3 * e2[2]) / sum(e2), rel=1e-6)
    assert U.nbest_aggregate(values, lp, mask, "mc").tolist() == pytest.approx([2.0, 15.0])
    assert U.nbest_aggregate(values, lp, mask, "mc", nbest=1).tolist() == pytest.approx([1.0, 10.0])
    assert U.nbest_aggregate(values, lp, mask, "bs", nbest=1).tolist() == pytest.approx([1.0, 10.0])
    both = U.nbest_aggregate({"a": values, "b": 2 * values}, lp, mask, "mc", nbest=2)
    assert both["a"].tolist() == pytest.approx([1.5, 15.0]) and both["b"].tolist() == pytest.approx([3.0, 30.0])
    w = U.nbest_weights(lp, mask, "bs")
    assert w[1, 2] == 0 and torch.allclose(w.sum(-1), torch.ones(2))
    full = U.nbest_aggregate(values[:1], lp[:1], None, "mc")
    assert full.tolist() == pytest.approx([2.0])


# ---------------------------------------------------------------------------------------------
# Names


def test_authors_tables_point_at_keys_we_produce():
    log_probs, tokens, mask, _ = ensemble_case()
    acc = U.EnsembleHypothesisAccumulator(tokens, mask)
    for member in log_probs:
        acc.add(member)
    token, seq = acc.measures()
    assert set(U.AUTHORS_TOKEN_NAMES.values()) == set(token)
    assert set(U.AUTHORS_SEQUENCE_NAMES.values()) == set(seq) - {"score", "ep_log_prob"}
    assert set(U.AUTHORS_LABELS.values()) <= set(seq)
    assert set(U.AUTHORS_SHORT_NAMES.values()) <= set(token)
    assert "logcomvo" not in U.AUTHORS_LABELS
    theirs = U.to_authors_names(seq)
    assert list(theirs)[:4] == ["pe_entropy_of_expected", "expected_entropy", "pe_mutual_information", "pe_EPKL"]
    assert theirs["pe_sTU"] is seq["nll"] and theirs["log-prob"] is seq["log_prob"]
    # a Dirichlet student lacks the EP keys; the authors wrote zeros there
    alpha = torch.rand(2, 3, 5) + 0.5
    ones = torch.ones(2, 3, dtype=torch.bool)
    _, dseq = U.dirichlet_hypothesis_measures(alpha, torch.zeros(2, 3, dtype=torch.long), ones)
    assert "ep_sTU" not in U.to_authors_names(dseq)
    assert U.to_authors_names(dseq, fill_missing=0.0)["ep_sTU"] == 0.0
    assert U.to_authors_names({"total_uncertainty": 1.0}, "label") == {"Total Uncertainty-PE": 1.0}


def test_module_does_not_import_fairseq():
    tree = ast.parse(open(U.__file__).read())
    names = [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    names += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [n for n in names if n == "fairseq" or n.startswith("fairseq.")], names


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_alpha_raises(bad):
    alpha = torch.ones(2, 3, 4)
    alpha[1, 2, 3] = bad
    with pytest.raises(ValueError, match="finite and > 0"):
        U.dirichlet_token_measures(alpha)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="finite and > 0"):
        U.dirichlet_hypothesis_measures(alpha, torch.zeros(2, 3, dtype=torch.long), mask)
    mask[1, 2] = False  # a bad alpha at padding is ignored
    token, _ = U.dirichlet_hypothesis_measures(alpha, torch.zeros(2, 3, dtype=torch.long), mask)
    assert (token["mutual_information"][1, 2] == 0).all()


def test_shape_mismatches_raise():
    alpha, tokens, mask = torch.ones(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"tokens of shape \(2, 4\)"):
        U.dirichlet_token_measures(alpha, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask of shape"):
        U.dirichlet_hypothesis_measures(alpha, tokens, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        U.dirichlet_hypothesis_measures(alpha, tokens, mask.long())
    with pytest.raises(ValueError, match=r"token measure 'u' has shape \(2, 2\)"):
        U.sequence_measures({"u": torch.zeros(2, 2)}, mask, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(M, B, T\)"):
        U.ensemble_target_measures(torch.zeros(3, 2, 4), mask)
    with pytest.raises(ValueError, match=r"\(M, B, T\)"):
        U.ensemble_sequence_measures(torch.zeros(2, 3), mask)
    acc = U.EnsembleHypothesisAccumulator(tokens, mask)
    with pytest.raises(ValueError, match="member 0 .*\\(2, 4, 4\\)"):
        acc.add(torch.zeros(2, 4, 4))
    stats = ensemble_statistics([torch.zeros(2, 3, 4).log_softmax(-1)] * 2)
    with pytest.raises(ValueError, match="ep_mean_probs of shape"):
        U.ensemble_token_measures(stats, torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"has shape \(1, 3\)"):
        U.nbest_aggregate(torch.zeros(1, 3), torch.zeros(2, 3))


def test_nan_inputs_raise():
    mask = torch.tensor([[True, True, False]])
    u = torch.tensor([[0.0, float("nan"), 0.0]])
    with pytest.raises(ValueError, match="NaN at hypothesis tokens in u"):
        U.sequence_measures({"u": u, "v": torch.zeros(1, 3)}, mask, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="NaN at hypothesis tokens in log_prob"):
        U.sequence_measures({}, mask, u)
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        U.ensemble_target_measures(u.expand(2, 1, 3), mask)
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        U.nbest_aggregate(torch.zeros(1, 3), u)
    with pytest.raises(ValueError, match="NaN in values"):
        U.nbest_aggregate(u, torch.zeros(1, 3), None, "mc")


def test_other_bad_inputs_raise():
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="no token"):
        U.sequence_measures({}, mask, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="no hypothesis"):
        U.nbest_aggregate(torch.zeros(2, 2), torch.zeros(2, 2), mask)
    with pytest.raises(ValueError, match="weighting"):
        U.nbest_weights(torch.zeros(1, 2), weighting="uniform")
    with pytest.raises(ValueError, match="temperature"):
        U.nbest_weights(torch.zeros(1, 2), temperature=0.0)
    with pytest.raises(ValueError, match="-inf"):
        U.nbest_weights(torch.full((1, 2), -math.inf))
    with pytest.raises(ValueError, match="nbest"):
        U.nbest_aggregate(torch.zeros(1, 2), torch.zeros(1, 2), nbest=0)
    with pytest.raises(ValueError, match="no ensemble member"):
        acc = U.EnsembleHypothesisAccumulator(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool))
        acc.finalize()
    with pytest.raises(ValueError, match="table"):
        U.to_authors_names({}, "json")
