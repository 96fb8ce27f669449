"""Fidelity metrics on inputs whose values are known by hand."""
import math

import pytest
import torch

from kcache.eval.metrics import greedy_agreement, mean_kl, perplexity, summarize, top1_agreement


def test_identical_logits_agree_fully():
    logits = torch.randn(3, 17, 50, generator=torch.Generator().manual_seed(0))
    assert top1_agreement(logits, logits.clone()) == 1.0
    assert mean_kl(logits, logits.clone()) == pytest.approx(0.0, abs=1e-12)


def test_perplexity_is_exp_of_mean_nll():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(2))
    nll = []
    for row, tgt in zip(logits.reshape(-1, 11).tolist(), targets.reshape(-1).tolist()):
        log_z = math.log(sum(math.exp(x) for x in row))
        nll.append(log_z - row[tgt])
    assert perplexity(logits, targets) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-12)


def test_uniform_logits_give_vocab_size_perplexity():
    assert perplexity(torch.zeros(7, 50), torch.arange(7)) == pytest.approx(50.0, rel=1e-12)


def test_perplexity_ignores_a_constant_logit_shift():
    logits = torch.randn(9, 20, generator=torch.Generator().manual_seed(3))
    targets = torch.arange(9)
    assert perplexity(logits + 100.0, targets) == pytest.approx(perplexity(logits, targets), rel=1e-6)


def test_kl_by_hand_and_argument_order():
    p = torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=torch.float64)
    q = torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64)
    kl_pq = [sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr)) for pr, qr in zip(p.tolist(), q.tolist())]
    kl_qp = [sum(qi * math.log(qi / pi) for pi, qi in zip(pr, qr)) for pr, qr in zip(p.tolist(), q.tolist())]
    assert mean_kl(p.log(), q.log()) == pytest.approx(sum(kl_pq) / 2, rel=1e-12)  # KL(ref || approx)
    assert mean_kl(q.log(), p.log()) == pytest.approx(sum(kl_qp) / 2, rel=1e-12)
    assert sum(kl_pq) != pytest.approx(sum(kl_qp))  # the two orders really differ on this case


def test_metrics_span_several_blocks():
    # More positions than one float64 block: the blocked sums equal a one-shot computation.
    g = torch.Generator().manual_seed(4)
    ref, approx = torch.randn(2500, 8, generator=g), torch.randn(2500, 8, generator=g)
    targets = torch.randint(0, 8, (2500,), generator=g)
    lp, lq = ref.double().log_softmax(-1), approx.double().log_softmax(-1)
    expected_kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    expected_ppl = math.exp(-lq.gather(1, targets[:, None]).mean().item())
    assert mean_kl(ref, approx) == pytest.approx(expected_kl, rel=1e-9)
    assert perplexity(approx, targets) == pytest.approx(expected_ppl, rel=1e-9)


def test_top1_agreement_counts_positions():
    ref = torch.eye(4)  # argmax 0, 1, 2, 3
    approx = torch.eye(4)[[0, 1, 2, 0]]
    assert top1_agreement(approx, ref) == 0.75


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        mean_kl(torch.zeros(3, 5), torch.zeros(4, 5))
    with pytest.raises(ValueError):
        perplexity(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))


def test_greedy_agreement():
    assert greedy_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (4, 1.0)
    assert greedy_agreement(torch.tensor([1, 2, 9, 4]), torch.tensor([1, 2, 3, 4])) == (2, 0.75)
    assert greedy_agreement([1, 2], [1, 2, 3, 4]) == (2, 0.5)  # a shorter run differs past its end
    assert greedy_agreement([], []) == (0, 1.0)


def test_summarize():
    assert summarize([True, False, True, True]) == {"correct": 3, "total": 4, "accuracy": 0.75}
    assert summarize([]) == {"correct": 0, "total": 0, "accuracy": 0.0}
