"""Single-process MoCo emulates shuffled BN as MoCo's CIFAR demo: split BatchNorm in one call, keys shuffled."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kt_edge.models.backbones import Backbone, build_backbone
from kt_edge.models.split_batchnorm import SplitBatchNorm2d, split_count, use_split_batchnorm
from kt_edge.teachers.moco import MoCo

OPTIONS = {"queue": 64, "hidden": 16, "dim": 8}


def _moco(body: nn.Module, splits: int) -> MoCo:
    torch.manual_seed(0)
    return MoCo(Backbone("resnet18", 8, body, 12), {**OPTIONS, "bn_splits": splits}, n_images=512)


def _batch(n=64):
    torch.manual_seed(1)
    return (torch.randn(n, 3, 8, 8), torch.randn(n, 3, 8, 8)), None


def test_without_batchnorm_splitting_changes_nothing():
    """The keys come back in their images' order: a BN-free net gives the same loss however it is split."""
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 12))
    losses = []
    for splits in (1, 2):
        method = _moco(linear, splits)
        torch.manual_seed(2)
        losses.append(method.training_step(_batch())["loss"])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("splits", [2, 4])
def test_split_batchnorm_normalises_each_split_alone_and_updates_the_statistics_once(splits):
    """Reference: a plain BatchNorm on each split (samples i % splits) by itself; the running statistics are the
    mean of the splits' updates, one update per call (the official SplitBatchNorm's)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    x = torch.randn(16, 5, 4, 4) * 3 + 1
    means, variances, expected = [], [], torch.empty_like(x)
    for j in range(splits):
        mean, var = bn.running_mean.clone(), bn.running_var.clone()
        expected[j::splits] = F.batch_norm(x[j::splits], mean, var, bn.weight, bn.bias, True, bn.momentum, bn.eps)
        means.append(mean)
        variances.append(var)
    use_split_batchnorm(bn)
    assert isinstance(bn, SplitBatchNorm2d)
    bn.splits = splits
    torch.testing.assert_close(bn(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var, torch.stack(variances).mean(0), rtol=1e-6, atol=1e-6)
    assert int(bn.num_batches_tracked) == 1
    bn.eval()
    torch.testing.assert_close(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False))


def test_a_split_network_keeps_the_plain_state_dict():
    net = build_backbone("resnet18", 32)
    keys = net.state_dict().keys()
    layers = use_split_batchnorm(net)
    assert len(layers) == 20 and net.state_dict().keys() == keys
    build_backbone("resnet18", 32).load_state_dict(net.state_dict())


@pytest.mark.parametrize(
    "batch, wanted, expected", [(512, 8, 8), (256, 8, 8), (64, 8, 2), (96, 8, 3), (48, 8, 1), (64, 1, 1), (24, 8, 1)]
)
def test_splits_hold_at_least_32_images_and_divide_the_batch(batch, wanted, expected):
    assert split_count(batch, wanted, 32) == expected


def test_one_query_and_one_key_forward_a_step_with_the_keys_shuffled():
    body = nn.Sequential(nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    method = _moco(body, 8)
    seen = {"query": [], "key": []}
    method.backbone.register_forward_hook(lambda _m, args, _out: seen["query"].append(args[0]))
    method.key_backbone.register_forward_hook(lambda _m, args, _out: seen["key"].append(args[0]))
    (query_view, key_view), _ = _batch(64)
    method.training_step(((query_view, key_view), None))
    assert len(seen["query"]) == len(seen["key"]) == 1
    assert {layer.splits for layer in method._split_layers} == {2}  # 64 images: two splits of 32
    assert torch.equal(seen["query"][0], query_view)
    keys = seen["key"][0]
    assert not torch.equal(keys, key_view)  # in another order ...
    assert torch.equal(keys.flatten(1).sum(1).sort().values, key_view.flatten(1).sum(1).sort().values)
