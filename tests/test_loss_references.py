"""Each loss equals its official code's formula, written out here as that code computes it (seeded inputs,
over batch sizes, dimensions, queue sizes and temperatures).

References: SEED's builder.py and soft cross-entropy (jacobswan1/SEED), CompRess's KLD and memory banks
(UMBCvision/CompRess nn/compress_loss.py), MoCo v2's builder.py (facebookresearch/moco), SimCLR's
add_contrastive_loss (google-research/simclr, averaged over the two views), Barlow Twins' main.py
(facebookresearch/barlowtwins).
"""

import pytest
import torch
import torch.nn.functional as F

from kt_edge.teachers.barlow import barlow_loss
from kt_edge.teachers.moco import moco_loss
from kt_edge.teachers.simclr import nt_xent
from kt_edge.transfer.compress import compress_loss
from kt_edge.transfer.seed import seed_loss

SIZES = [(4, 8, 16), (32, 128, 256)]  # batch, dimension, queue


def _inputs(n, dim, queue, seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    return unit(n, dim), unit(n, dim), unit(queue, dim), unit(queue, dim)


@pytest.mark.parametrize("n, dim, queue", SIZES)
@pytest.mark.parametrize("tau_s, tau_t", [(0.2, 1e-4), (0.1, 0.01), (0.5, 0.5)])
def test_seed(n, dim, queue, tau_s, tau_t):
    s, t, bank, _ = _inputs(n, dim, queue)
    q = bank.T  # the official queue is dim x K
    logit_stu = torch.cat([torch.einsum("nc,nc->n", s, t)[:, None], torch.einsum("nc,ck->nk", s, q)], 1) / tau_s
    logit_tea = F.softmax(
        torch.cat([torch.einsum("nc,nc->n", t, t)[:, None], torch.einsum("nc,ck->nk", t, q)], 1) / tau_t, dim=1
    )
    official = torch.sum(-logit_tea * F.log_softmax(logit_stu, dim=1), dim=1).mean()  # soft cross-entropy
    torch.testing.assert_close(seed_loss(s, t, bank, tau_s, tau_t), official, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n, dim, queue", SIZES)
@pytest.mark.parametrize("tau", [0.04, 0.2])
def test_compress(n, dim, queue, tau):
    s, t, teacher_bank, student_bank = _inputs(n, dim, queue)
    official = F.kl_div(
        F.log_softmax(torch.mm(student_bank, s.T).T / tau, dim=1),
        F.softmax(torch.mm(teacher_bank, t.T).T / tau, dim=1),
        reduction="batchmean",
    )
    torch.testing.assert_close(
        compress_loss(s, t, student_bank, teacher_bank, tau, tau), official, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("n, dim, queue", SIZES)
@pytest.mark.parametrize("tau", [0.07, 0.2])
def test_moco(n, dim, queue, tau):
    q, k, bank, _ = _inputs(n, dim, queue)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, bank.T)
    logits = torch.cat([l_pos, l_neg], dim=1) / tau
    official = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))
    torch.testing.assert_close(moco_loss(q, k, bank, tau), official, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n, dim", [(4, 8), (32, 128)])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent(n, dim, tau):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    h1, h2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    masks = torch.eye(n) * 1e9
    labels = torch.arange(n)
    logits_aa, logits_bb = h1 @ h1.T / tau - masks, h2 @ h2.T / tau - masks
    logits_ab, logits_ba = h1 @ h2.T / tau, h2 @ h1.T / tau
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)
    torch.testing.assert_close(nt_xent(z1, z2, tau), (loss_a + loss_b) / 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n, dim", [(8, 16), (64, 256)])
@pytest.mark.parametrize("lambd", [5e-3, 0.1])
def test_barlow(n, dim, lambd):
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    bn = torch.nn.BatchNorm1d(dim, affine=False)
    c = bn(z1).T @ bn(z2) / n
    on_diag = torch.diagonal(c).add(-1).pow(2).sum()
    off = c.flatten()[:-1].view(dim - 1, dim + 1)[:, 1:].flatten()  # the official off_diagonal()
    official = on_diag + lambd * off.pow(2).sum()
    torch.testing.assert_close(barlow_loss(z1, z2, lambd), official, rtol=1e-5, atol=1e-5)
