"""Every similarity loss is computed in fp32 with autocast off: under bf16 autocast it equals its fp32 value.

Without it SEED's tau_T = 1e-4 turns one bf16 rounding step of a cosine into tens of logits, and the
teacher's target moves off its positive (DESIGN.md).
"""

import pytest
import torch
import torch.nn.functional as F

from kt_edge.teachers.barlow import barlow_loss
from kt_edge.teachers.byol import regression_loss
from kt_edge.teachers.moco import moco_loss
from kt_edge.teachers.simclr import nt_xent
from kt_edge.transfer.compress import compress_loss
from kt_edge.transfer.regress import regress_loss
from kt_edge.transfer.seed import seed_loss


def _unit(*shape, generator):
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def _close_features(n, dim, generator):
    """High-cosine features, as an early teacher gives: every row near one direction."""
    base = torch.randn(1, dim, generator=generator)
    return F.normalize(base + 0.05 * torch.randn(n, dim, generator=generator), dim=1)


def _losses(n, dim, queue, tau, generator):
    s, t = _unit(n, dim, generator=generator), _close_features(n, dim, generator)
    bank = torch.cat([_close_features(queue // 2, dim, generator), _unit(queue // 2, dim, generator=generator)])
    z1, z2 = torch.randn(n, dim, generator=generator), torch.randn(n, dim, generator=generator)
    return {
        "seed": lambda: seed_loss(s, t, bank, 0.2, tau),
        "seed_no_self_positive": lambda: seed_loss(s, t, bank, 0.2, tau, self_positive=False),
        "compress": lambda: compress_loss(s, t, bank, bank, 0.04, 0.04),
        "moco": lambda: moco_loss(s, t, bank, max(tau, 0.07)),
        "nt_xent": lambda: nt_xent(z1, z2, max(tau, 0.1)),
        "barlow": lambda: barlow_loss(z1, z2, 5e-3),
        "regress": lambda: regress_loss(z1, z2),
        "byol": lambda: regression_loss(z1, z2),
    }


@pytest.mark.parametrize("n, dim, queue", [(8, 16, 64), (32, 128, 256)])
@pytest.mark.parametrize("tau", [1e-4, 1e-2])
def test_each_loss_under_bf16_autocast_equals_its_fp32_value(n, dim, queue, tau):
    names = _losses(n, dim, queue, tau, torch.Generator().manual_seed(0)).keys()
    for name in names:
        exact = _losses(n, dim, queue, tau, torch.Generator().manual_seed(0))[name]()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = _losses(n, dim, queue, tau, torch.Generator().manual_seed(0))[name]()
        assert mixed.dtype == torch.float32, name
        torch.testing.assert_close(mixed, exact, rtol=1e-6, atol=1e-6, msg=name)


def test_bf16_similarities_would_move_seeds_target_off_its_positive():
    """What the fp32 rule prevents, shown on the same features: the bf16 target is another distribution."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 128, generator=g)
    t, bank = (F.normalize(base + 0.2 * torch.randn(n, 128, generator=g), dim=1) for n in (64, 1024))
    exact = F.softmax(t @ bank.T / 1e-4, dim=1)
    rounded = F.softmax((t.bfloat16() @ bank.bfloat16().T).float() / 1e-4, dim=1)
    assert (exact.argmax(1) != rounded.argmax(1)).float().mean() > 0.3  # the most similar anchor changes
    assert (exact - rounded).abs().sum(1).mean() / 2 > 0.3  # total variation: a third of the mass moves
