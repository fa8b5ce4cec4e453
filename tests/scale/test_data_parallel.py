"""Two gloo processes, joined as torchrun would join them, train like one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import ddp_train
import numpy as np
import pytest
import torch
import torch.distributed as dist
from sample_kit import REPO

from kt_edge.data.feed import EpochSampler
from kt_edge.engine import distributed
from kt_edge.errors import KtEdgeError


def _torchrun(out: Path) -> None:
    """Every scenario of ddp_train.py as 2 gloo ranks started by torchrun, as a user would start them."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(Path(ddp_train.__file__)),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The scenarios under torchrun (two processes), as two threads of this process, and as one process."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    root = tmp_path_factory.mktemp("ddp")
    _torchrun(root / "torchrun")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ddp_train.emulate(root / "threads")
        for name in ddp_train.SCENARIOS:
            ddp_train.run(name, root / "one")
    finally:
        torch.set_num_threads(threads)
    return root


def _losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _states(folder: Path) -> list[dict]:
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(ddp_train.WORLD)]


@pytest.mark.parametrize("name", list(ddp_train.SCENARIOS))
def test_torchrun_equals_its_one_process_emulation_bit_for_bit(runs, name):
    """Two real ranks and the same two ranks as threads: every logged loss and every weight, queue and
    BatchNorm statistic equal to the bit, for SEED, MoCo, SimCLR, BYOL and Barlow Twins."""
    real, emulated = runs / "torchrun" / name, runs / "threads" / name
    assert len(_losses(real)) == 6, "rank 0 alone writes metrics, one line per step"
    assert _losses(real) == _losses(emulated)
    for rank, (ours, theirs) in enumerate(zip(_states(real), _states(emulated))):
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            assert torch.equal(value, theirs[key]), f"rank {rank}: {key}"
    states = _states(real)
    for key, value in states[0].items():  # the ranks stay in step: the weights and queues agree
        if "running_" not in key and "num_batches" not in key:  # per-rank BatchNorm statistics may differ
            assert torch.equal(value, states[1][key]), key


@pytest.mark.parametrize("name", ["seed_per_sample", "seed_batched"])
def test_bn_free_seed_on_two_ranks_trains_like_one_process_on_the_global_batch(runs, name):
    one, two = runs / "one" / name, runs / "torchrun" / name
    torch.testing.assert_close(torch.tensor(_losses(two)), torch.tensor(_losses(one)), rtol=1e-4, atol=1e-5)
    single, ranks = torch.load(one / "rank0.pt", weights_only=True), _states(two)
    for key, value in single.items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-5, msg=f"{key} differs from 1 process")
    assert not torch.equal(single["queue.items"], ddp_train.method_for("seed", 64).queue.items)  # it was filled


def test_moco_keys_are_shuffled_across_ranks_and_the_queue_holds_both(runs):
    ranks = _states(runs / "torchrun" / "moco_batched")
    assert torch.equal(ranks[0]["queue.items"], ranks[1]["queue.items"])
    assert (runs / "torchrun" / "moco_batched" / "resume.pt").is_file()


def test_shuffled_bn_mixes_ranks_and_unshuffles_exactly():
    def work(rank):
        mine = torch.arange(8) + 8 * rank  # global indices of this rank's images
        shuffled, inverse = distributed.shuffle_batch(mine.float()[:, None])
        return mine, shuffled[:, 0], distributed.unshuffle_batch(shuffled, inverse)[:, 0]

    seen = ddp_train.in_threads(work)
    assert sorted(torch.cat([s for _, s, _ in seen]).tolist()) == list(range(16))
    assert any(v >= 8 for v in seen[0][1]) or any(v < 8 for v in seen[1][1])
    for mine, _, back in seen:
        assert torch.equal(back.long(), mine)


@pytest.mark.parametrize("loss", ["nt_xent", "barlow"])
def test_global_negatives_and_correlation_equal_one_process_on_the_global_batch(loss, one_thread):
    """SimCLR's gathered negatives and Barlow's summed correlation: the ranks' mean loss and, averaged as DDP
    does, the gradient are those of one process on the whole batch."""
    from kt_edge.teachers.barlow import barlow_loss
    from kt_edge.teachers.simclr import nt_xent

    fn = {"nt_xent": lambda a, b: nt_xent(a, b, 0.5), "barlow": lambda a, b: barlow_loss(a, b, 5e-3)}[loss]
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    whole = [z.clone().requires_grad_() for z in (z1, z2)]
    expected = fn(*whole)
    expected.backward()

    def work(rank):
        mine = [z[8 * rank : 8 * (rank + 1)].clone().requires_grad_() for z in (z1, z2)]
        value = fn(*mine)
        (value / ddp_train.WORLD).backward()  # DDP averages the ranks' gradients
        return value.detach(), [m.grad for m in mine]

    ranks = ddp_train.in_threads(work)
    mean = sum(value for value, _ in ranks) / ddp_train.WORLD  # what the trainer logs (the ranks' mean)
    torch.testing.assert_close(mean, expected.detach(), rtol=1e-5, atol=1e-6)
    for i, part in enumerate(whole):
        torch.testing.assert_close(torch.cat([grads[i] for _, grads in ranks]), part.grad, rtol=1e-4, atol=1e-6)


def test_rank_slices_of_each_global_batch_make_up_the_one_process_batch():
    one = [i for _, i in EpochSampler(50, seed=3, epoch=1, start=16)]
    slices = [
        [i for _, i in EpochSampler(50, seed=3, epoch=1, start=16, rank=r, world=2, batch_size=8)] for r in (0, 1)
    ]
    assert all(len(s) == len(EpochSampler(50, 3, 1, 16, rank=0, world=2, batch_size=8)) == 16 for s in slices)
    for b in range(4):  # four full global batches of 8 after the start
        assert slices[0][4 * b : 4 * b + 4] + slices[1][4 * b : 4 * b + 4] == one[8 * b : 8 * b + 8]


def test_one_process_helpers_are_identities(monkeypatch):
    x = torch.randn(4, 3)
    assert distributed.concat_all_gather(x) is x
    shuffled, inverse = distributed.shuffle_batch(x)
    assert shuffled is x and distributed.unshuffle_batch(x, inverse) is x
    assert distributed.agree({"loss": torch.tensor(2.5)}, {"stop": True, "due": False}) == (
        {"loss": 2.5},
        {"stop": True, "due": False},
    )
    assert distributed.init_from_env("cpu") is False  # WORLD_SIZE unset: no process group
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(KtEdgeError, match="distill.train.batch_size 16 does not split evenly over 3"):
        distributed.local_batch_size(16, "distill.train.batch_size")


def test_an_imported_teacher_is_written_by_rank_0_and_read_by_all_once_whole(tmp_path, monkeypatch, one_thread):
    """Every rank writing it would let one rank see a half-written teacher (its sidecar removed first)."""
    import yaml
    from sample_kit import tiny_recipe_dict

    from kt_edge.models.backbones import build_backbone
    from kt_edge.models.checkpoint import read_sidecar
    from kt_edge.recipe import load_recipe
    from kt_edge.stages import run, teacher

    torch.save(
        {k.removeprefix("body."): v for k, v in build_backbone("resnet18", 32).state_dict().items()},
        tmp_path / "supervised.pth",
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            tiny_recipe_dict(
                tmp_path / "runs", teacher={"checkpoint": str(tmp_path / "supervised.pth"), "format": "torchvision"}
            )
        )
    )
    recipe = load_recipe(path)
    writers, save = [], teacher.save_backbone
    monkeypatch.setattr(teacher, "save_backbone", lambda *a, **k: writers.append(distributed.rank()) or save(*a, **k))

    def work(rank):
        folder = run.teacher(recipe)
        return read_sidecar(folder)["method"]  # every rank finds it complete on return

    assert ddp_train.in_threads(work) == ["imported", "imported"]
    assert writers == [0]


def test_every_rank_decodes_its_share_of_the_image_cache(tmp_path, one_thread):
    """No rank waits on another's long CPU work: the two ranks' halves make the same array as one process."""
    from sample_kit import SAMPLE

    from kt_edge.data.cache import build_cache
    from kt_edge.data.sources import open_images

    images = open_images(SAMPLE / "train", subset=40, seed=0)
    single = build_cache(images, tmp_path / "one", 32, "fp", chunk=8, progress=False)
    shared = ddp_train.in_threads(
        lambda rank: build_cache(images, tmp_path / "two", 32, "fp", chunk=8, progress=False).array.copy()
    )
    assert all(np.array_equal(array, single.array) for array in shared)
    assert not list((tmp_path / "two").glob("progress*"))


def test_kmeans_under_torchrun_splits_the_sample_over_the_ranks_and_agrees_with_one_process(one_thread):
    from kt_edge.kmeans import fit_clusters

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((600, 8)) + np.repeat(np.eye(8)[:6] * 8, 100, axis=0)).astype(np.float32)
    one, one_result = fit_clusters(x, 6, niter=10, seed=0, use_gpu=False)
    ranks = ddp_train.in_threads(lambda rank: fit_clusters(x, 6, niter=10, seed=0, collective=True))
    for model, result in ranks:
        assert result.engine == "torch" and result.n_train == 600
        np.testing.assert_allclose(result.objective, one_result.objective, rtol=1e-4)
        np.testing.assert_array_equal(model.centroids, ranks[0][0].centroids)  # every rank has the same


def test_a_whole_run_under_two_ranks_ends_with_rank_0_evaluating_and_exporting(tmp_path, one_thread):
    """Eval and export are rank 0's alone: their stage must not wait for ranks that have already returned."""
    from sample_kit import tiny_recipe_dict

    from kt_edge.recipe import recipe_from_dict
    from kt_edge.stages import run

    alone = {"method": "moco", "options": {"queue": 64, "hidden": 64, "dim": 32, "momentum": 0.99}}
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path, distill=alone, eval={"protocols": ["knn"]}))
    finished = ddp_train.in_threads(lambda rank: run.run_stages(recipe))
    assert finished[1] is None
    results, report = finished[0]
    assert set(results) == {"student", "random_init"} and report["results"]["fp32"]["passed"]
