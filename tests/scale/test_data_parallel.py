"""Two gloo processes, joined as torchrun would join them, train like one process with the same global batch."""

import json
import math
import multiprocessing
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from kt_edge.engine import distributed
from kt_edge.engine.trainer import EpochSampler
from kt_edge.errors import KtEdgeError

import ddp_train


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every scenario of ddp_train.py as 2 gloo ranks (this process is rank 0, a spawned one rank 1),
    then each again as one process."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    root = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    other = multiprocessing.get_context("spawn").Process(target=ddp_train.rank_main, args=(1, port, root / "two"))
    other.start()
    try:
        ddp_train.rank_main(0, port, root / "two")
        other.join(120)
        assert other.exitcode == 0, f"rank 1 exited with {other.exitcode}"
    finally:
        if other.is_alive():
            other.kill()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ddp_train.SCENARIOS:
            ddp_train.run(name, root / "one")
    finally:
        torch.set_num_threads(threads)
    return root


def _losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["seed_per_sample", "seed_batched"])
def test_same_loss_trajectory_and_weights_as_one_process(two_ranks, name):
    one, two = two_ranks / "one" / name, two_ranks / "two" / name
    assert len(_losses(two)) == 6, "rank 0 alone writes metrics, one line per step"
    torch.testing.assert_close(torch.tensor(_losses(two)), torch.tensor(_losses(one)), rtol=1e-4, atol=1e-5)
    single = torch.load(one / "rank0.pt", weights_only=True)
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key, value in single.items():
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=f"ranks differ in {key}")
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-5, msg=f"{key} differs from 1 process")
    assert not torch.equal(single["queue.items"], ddp_train.method_for("seed", 64).queue.items)  # it was filled


def test_moco_ranks_stay_in_step_with_shuffled_bn(two_ranks):
    two = two_ranks / "two" / "moco_batched"
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ("queue.items", "backbone.body.0.weight", "key_backbone.body.0.weight"):
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=key)
    assert all(math.isfinite(v) for v in _losses(two)) and (two / "resume.pt").is_file()


def test_shuffled_bn_mixes_ranks_and_unshuffles_exactly(two_ranks):
    seen = [json.loads((two_ranks / "two" / f"shuffle{r}.json").read_text()) for r in (0, 1)]
    assert sorted(seen[0]["shuffled"] + seen[1]["shuffled"]) == list(range(16))
    assert any(v >= 8 for v in seen[0]["shuffled"]) or any(v < 8 for v in seen[1]["shuffled"])
    for rank in seen:
        assert rank["back"] == rank["mine"]


def test_rank_slices_of_each_global_batch_make_up_the_one_process_batch():
    one = list(EpochSampler(50, seed=3, epoch=1, start=16))
    slices = [list(EpochSampler(50, seed=3, epoch=1, start=16, rank=r, world=2, batch_size=8)) for r in (0, 1)]
    assert all(len(s) == len(EpochSampler(50, 3, 1, 16, rank=0, world=2, batch_size=8)) == 16 for s in slices)
    for b in range(4):  # four full global batches of 8 after the start
        assert slices[0][4 * b:4 * b + 4] + slices[1][4 * b:4 * b + 4] == one[8 * b:8 * b + 8]


def test_one_process_helpers_are_identities(monkeypatch):
    x = torch.randn(4, 3)
    assert distributed.concat_all_gather(x) is x
    shuffled, inverse = distributed.shuffle_batch(x)
    assert shuffled is x and distributed.unshuffle_batch(x, inverse) is x
    assert distributed.mean_scalars({"loss": torch.tensor(2.5)}) == {"loss": 2.5}
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.init_from_env("cpu") is False  # WORLD_SIZE unset: no process group
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(KtEdgeError, match="distill.train.batch_size 16 does not split evenly over 3"):
        distributed.local_batch_size(16, "distill.train.batch_size")
