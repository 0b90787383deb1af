"""The B-DISTIL-style boosting math (fairseq_pdd.bdistil.boosting) against independent oracles."""
import math

import pytest
import torch

from fairseq_pdd.bdistil import boosting


def _rand(n=6, v=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, v, generator=g, dtype=torch.float64) * 2 for _ in range(3)], g


def test_product_of_experts_is_the_normalised_product_of_member_distributions():
    members, _ = _rand()
    poe = boosting.ProductOfExperts()
    for k, z in enumerate(members, start=1):
        poe.add(z)
        product = torch.ones_like(z)
        for m in members[:k]:
            product = product * torch.softmax(m, -1)  # explicit product of the members' distributions
        expected = product / product.sum(-1, keepdim=True)
        torch.testing.assert_close(poe.log_probs().exp(), expected)
        torch.testing.assert_close(poe.log_probs(), torch.log_softmax(sum(members[:k]), -1))  # = softmax of summed logits


def test_average_is_the_normalised_geometric_mean():
    members, _ = _rand(seed=1)
    poe = boosting.ProductOfExperts(average=True)
    for z in members:
        poe.add(z)
    geo = torch.stack([torch.softmax(z, -1) for z in members]).prod(0) ** (1 / 3)
    torch.testing.assert_close(poe.log_probs().exp(), geo / geo.sum(-1, keepdim=True))


def test_product_of_experts_refuses_different_vocabularies():
    poe = boosting.ProductOfExperts()
    poe.add(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="target vocabularies differ"):
        poe.add(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="no member"):
        boosting.ProductOfExperts().log_probs()


def test_kl_against_torch_distributions_and_uniform_prefix():
    members, g = _rand(seed=2)
    q = torch.softmax(torch.randn(6, 7, generator=g, dtype=torch.float64), -1)
    q[0, 3] = 0.0  # a zero-probability class adds nothing (0 log 0 = 0)
    q = q / q.sum(-1, keepdim=True)
    log_p = torch.log_softmax(members[0], -1)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(probs=q), torch.distributions.Categorical(logits=log_p)
    )
    torch.testing.assert_close(boosting.kl_to_teacher(q, log_p), expected)
    uniform = torch.full_like(log_p, -math.log(7))
    torch.testing.assert_close(boosting.uniform_kl(q), boosting.kl_to_teacher(q, uniform))


def test_weights_are_exp_eta_error_normalised_to_mean_one():
    s = torch.tensor([0.0, 1.0, 3.0, 10.0])
    w = boosting.boosting_weights(s, 0.5)
    expected = torch.exp(0.5 * s)
    expected = expected / expected.mean()
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(boosting.boosting_weights(s, 0.0), torch.ones(4))
    huge = boosting.boosting_weights(torch.tensor([0.0, 1e4]), 1.0)  # no overflow
    assert torch.isfinite(huge).all() and huge.mean().item() == pytest.approx(1.0)


def test_residual_loss_value_and_gradient_w_times_p_minus_q():
    members, g = _rand(seed=3)
    q = torch.softmax(torch.randn(6, 7, generator=g, dtype=torch.float64), -1)
    target = torch.randint(0, 7, (6,), generator=g)
    weights = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    frozen = torch.log_softmax(members[0], -1) + torch.log_softmax(members[1], -1)
    z = members[2].clone().requires_grad_(True)
    poe = boosting.ProductOfExperts()
    for m in (members[0], members[1], z):
        poe.add(m)
    loss = boosting.residual_kd_loss(poe.log_probs(), q, target, weights).sum()
    (grad,) = torch.autograd.grad(loss, z)
    p = torch.softmax(frozen + z.detach(), -1)
    oracle = (weights * (q * (q.log() - p.log())).sum(-1)).sum()
    torch.testing.assert_close(loss.detach(), oracle)
    torch.testing.assert_close(grad, weights[:, None] * (p - q))  # boosting: the residual of the prefix

    beta = 0.3
    mixed = boosting.residual_kd_loss(poe.log_probs(), q, target, weights, gold_weight=beta)
    nll = -p.log().gather(-1, target[:, None]).squeeze(-1)
    kl = (q * (q.log() - p.log())).sum(-1)
    torch.testing.assert_close(mixed.detach(), weights * ((1 - beta) * kl + beta * nll))


def test_edge_and_acceptance_rule():
    w = torch.tensor([1.0, 3.0])
    prev, new = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])
    assert boosting.weighted_edge(w, prev, new) == pytest.approx(1 - (1 + 3) / (2 + 3))
    assert boosting.weighted_edge(w, torch.zeros(2), new) == 0.0
    assert boosting.accept(0.2, 1.0, 1.1, gamma=0.1).accepted
    assert not boosting.accept(0.05, 1.0, 1.1, gamma=0.1).accepted  # edge too small
    assert not boosting.accept(0.2, 1.2, 1.1, gamma=0.1).accepted  # unweighted KL rose
    assert boosting.accept(0.2, 1.15, 1.1, gamma=0.1, tolerance=0.1).accepted


@pytest.mark.parametrize("average", [False, True])
def test_members_added_for_some_rows_combine_row_by_row(average):
    """Early stopping adds later members for some rows only: each row is the product (or geometric
    mean) of exactly the members added for it, as if combined row by row."""
    members, _ = _rand(seed=4)
    subsets = [None, torch.tensor([0, 2, 3, 5]), torch.tensor([2, 5])]
    poe = boosting.ProductOfExperts(average=average)
    for z, rows in zip(members, subsets):
        poe.add(z if rows is None else z[rows], rows)
    for row in range(6):
        mine = [z[row] for z, rows in zip(members, subsets) if rows is None or row in rows.tolist()]
        total = sum(torch.log_softmax(z, -1) for z in mine)
        expected = torch.log_softmax(total / len(mine) if average else total, -1)
        torch.testing.assert_close(poe.log_probs()[row], expected)
    with pytest.raises(ValueError, match="must cover every row"):
        boosting.ProductOfExperts().add(members[0][:2], torch.tensor([0, 1]))


def test_early_stopping_rule():
    """Strict confidence test (tau = 1 never stops, tau = 0 always does) and the monotone member count."""
    log_probs = torch.log(torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]]))
    assert boosting.confident(log_probs, 0.5).tolist() == [False, True, True]
    assert not boosting.confident(log_probs, 1.0).any() and boosting.confident(log_probs, 0.0).all()
    first = torch.tensor([[3, 2, 3, 1, 3], [4, 4, 4, 4, 4]])  # 4: no prefix of the 3 members is confident
    assert boosting.members_used(first, 3).tolist() == [[3, 2, 2, 1, 1], [3, 3, 3, 3, 3]]
