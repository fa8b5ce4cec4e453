import math

import torch
import torch.nn.functional as F

from kt_edge.engine.queue import FeatureQueue
from kt_edge.teachers.moco import moco_loss
from kt_edge.transfer.seed import seed_loss


def test_seed_loss_matches_hand_computation():
    # one sample, 2-d embeddings, a queue of two entries
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    tau_s, tau_t = 0.5, 0.25
    # logits with the teacher's own embedding prepended as the positive
    zs = [1.0 * 0.6, 0.0, -1.0]  # s.t, s.q1, s.q2
    zt = [1.0, 0.8, -0.6]  # t.t, t.q1, t.q2
    target = [math.exp(z / tau_t) for z in zt]
    target = [p / sum(target) for p in target]
    log_norm = math.log(sum(math.exp(z / tau_s) for z in zs))
    expected = -sum(p * (z / tau_s - log_norm) for p, z in zip(target, zs))
    assert seed_loss(s, t, queue, tau_s, tau_t).item() == pytest_approx(expected)


def test_seed_loss_without_self_positive_uses_queue_only():
    s = F.normalize(torch.randn(4, 8), dim=1)
    t = F.normalize(torch.randn(4, 8), dim=1)
    queue = F.normalize(torch.randn(16, 8), dim=1)
    target = F.softmax(t @ queue.T / 0.1, dim=1)
    expected = -(target * F.log_softmax(s @ queue.T / 0.2, dim=1)).sum(1).mean()
    assert torch.allclose(seed_loss(s, t, queue, 0.2, 0.1, self_positive=False), expected)


def test_seed_loss_is_minimal_when_student_equals_teacher_distribution():
    t = F.normalize(torch.randn(8, 16), dim=1)
    queue = F.normalize(torch.randn(32, 16), dim=1)
    same = seed_loss(t, t, queue, 0.2, 0.2)
    other = seed_loss(F.normalize(torch.randn(8, 16), dim=1), t, queue, 0.2, 0.2)
    assert same < other


def test_moco_loss_is_low_for_matching_keys():
    q = F.normalize(torch.randn(8, 16), dim=1)
    queue = F.normalize(torch.randn(64, 16), dim=1)
    assert moco_loss(q, q, queue, 0.2) < moco_loss(q, F.normalize(torch.randn(8, 16), dim=1), queue, 0.2)


def test_queue_is_fifo_and_wraps():
    queue = FeatureQueue(5, 2)
    for i in range(3):
        queue.push(torch.full((2, 2), float(i)))
    # 6 items into 5 slots: the oldest (first of batch 0) was overwritten by the last of batch 2
    assert queue.items[:, 0].tolist() == [2.0, 0.0, 1.0, 1.0, 2.0]
    assert int(queue.ptr) == 1


def pytest_approx(value):
    import pytest

    return pytest.approx(value, rel=1e-5)
