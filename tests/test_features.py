"""Feature embedding and the sharded on-disk store: correctness, resume, memmap reading."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from kt_edge.errors import DataError
from kt_edge.features import FeatureStore, embed, embed_with, extract

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KT_EDGE_SHARED_DATA", REPO.parent / "shared" / "data"))


class Tensors(Dataset):
    """Seeded random images; can be told to fail at one index to simulate a crash."""

    def __init__(self, n=100, fail_at=None, unlabelled=False):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = torch.arange(n) % 7
        self.fail_at = fail_at
        self.unlabelled = unlabelled
        self.calls = 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError(f"simulated crash at item {i}")
        self.calls += 1
        return self.x[i], -1 if self.unlabelled else int(self.y[i])


def small_model(dim=16):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32, dim),
    )


def test_embed_matches_direct_forward_and_keeps_train_mode():
    model, ds = small_model(), Tensors(50)
    model.train()
    feats, labels = embed(model, ds, batch_size=16, progress=False)
    assert feats.dtype == np.float32 and feats.shape == (50, 16)
    assert labels.dtype == np.int64 and labels.tolist() == (np.arange(50) % 7).tolist()
    with torch.no_grad():
        direct = model.eval()(ds.x).numpy()
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-6)
    model.train()
    embed(model, ds, batch_size=16, progress=False)
    assert model.training, "embed must restore the caller's train mode"
    # parameters must not become inference tensors: the model is still trainable
    model(ds.x[:2]).sum().backward()


@pytest.mark.parametrize("n, batch_size", [(50, 16), (7, 256)])
def test_every_runner_embeds_each_image_decoded_once(n, batch_size):
    """Export parity runs PyTorch and every ONNX file side by side: one pass, every runner on the same batch."""
    ds = Tensors(n)
    seen = []

    def wide(images):  # another width: each runner's features have their own dim
        seen.append(len(images))
        return torch.cat([images.flatten(1), images.flatten(1)], 1).numpy()

    feats, labels = embed_with({"flat": lambda images: images.flatten(1).numpy(), "wide": wide}, ds, batch_size)
    assert ds.calls == n and sum(seen) == n and max(seen) == min(batch_size, n)
    np.testing.assert_array_equal(feats["flat"], ds.x.flatten(1).numpy())
    np.testing.assert_array_equal(feats["wide"], np.concatenate([feats["flat"]] * 2, 1))
    assert labels.tolist() == (np.arange(n) % 7).tolist()


def test_embed_unlabelled_gives_minus_one():
    _, labels = embed(small_model(), Tensors(10, unlabelled=True), progress=False)
    assert (labels == -1).all()


def test_extract_store_roundtrip_and_memmap(tmp_path):
    model, ds = small_model(), Tensors(100)
    ref, ref_labels = embed(model, ds, batch_size=16, progress=False)
    store = extract(model, ds, tmp_path, batch_size=16, shard_size=30, fingerprint="abc", progress=False)
    assert sorted(p.name for p in tmp_path.glob("shard-*.npy")) == sorted(
        f"shard-{i:05d}{s}.npy" for i in range(4) for s in ("", ".labels")
    )
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["n"] == 100 and index["dim"] == 16 and index["dtype"] == "float16"
    assert index["fingerprint"] == "abc" and [s["n"] for s in index["shards"]] == [30, 30, 30, 10]
    store = FeatureStore.open(tmp_path)
    assert all(isinstance(f, np.memmap) for f in store.shard_features)
    assert store.n == len(store) == 100 and store.dim == 16
    np.testing.assert_array_equal(store.labels, ref_labels)
    full = store.to_array()
    assert full.dtype == np.float32
    np.testing.assert_allclose(full, ref, rtol=2e-3, atol=2e-3)  # fp16 storage
    blocks = list(store.batches(25))  # crosses shard borders (30)
    assert [len(b) for b in blocks] == [25, 25, 25, 25] and all(b.dtype == np.float32 for b in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), full)
    assert [len(b) for b in store.batches(64)] == [64, 36]


def test_interrupted_extract_resumes_to_identical_shards(tmp_path):
    model = small_model()
    clean = extract(model, Tensors(100), tmp_path / "clean", batch_size=16, shard_size=30, progress=False)

    crashing = Tensors(100, fail_at=80)  # second batch of shard 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(model, crashing, tmp_path / "resumed", batch_size=16, shard_size=30, progress=False)
    resumed_dir = tmp_path / "resumed"
    assert not (resumed_dir / "index.json").exists()
    with pytest.raises(DataError, match="index.json"):
        FeatureStore.open(resumed_dir)
    assert not (resumed_dir / "shard-00002.npy").exists() and not list(resumed_dir.glob("*.tmp"))
    (resumed_dir / ".shard-00002.npy.abc123.tmp").write_bytes(b"left by a killed run")
    done_before = {p.name: p.stat().st_mtime_ns for p in resumed_dir.glob("shard-0000[01]*.npy")}
    assert len(done_before) == 4

    again = Tensors(100)
    store = extract(model, again, resumed_dir, batch_size=16, shard_size=30, progress=False)
    assert again.calls == 40, "only shards 2 and 3 (40 items) should be embedded on resume"
    assert {p: (resumed_dir / p).stat().st_mtime_ns for p in done_before} == done_before
    assert not list(resumed_dir.glob("*.tmp"))
    for a in sorted(clean.root.glob("shard-*.npy")):
        assert a.read_bytes() == (resumed_dir / a.name).read_bytes(), a.name
    np.testing.assert_array_equal(store.to_array(), clean.to_array())

    third = Tensors(100)
    extract(model, third, resumed_dir, batch_size=16, shard_size=30, progress=False)
    assert third.calls == 0, "a finished store is not recomputed"


def test_changed_fingerprint_discards_old_shards(tmp_path):
    model = small_model()
    extract(model, Tensors(60), tmp_path, shard_size=30, fingerprint="v1", progress=False)
    ds = Tensors(60)
    store = extract(model, ds, tmp_path, shard_size=30, fingerprint="v2", progress=False)
    assert ds.calls == 60 and store.fingerprint == "v2"


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="empty dataset"):
        embed(small_model(), Tensors(0), progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        extract(small_model(), Tensors(5), tmp_path, shard_size=0, progress=False)


@pytest.mark.skipif(not (SHARED / "cifar10" / "test").is_dir(), reason=f"shared image data not found at {SHARED}")
def test_extract_real_cifar_images(tmp_path):
    from torchvision import datasets, models, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])
    full = datasets.ImageFolder(str(SHARED / "cifar10" / "test"), transform=tf)
    idx = np.random.default_rng(0).choice(len(full), 128, replace=False).tolist()
    ds = torch.utils.data.Subset(full, idx)
    torch.manual_seed(0)
    net = models.resnet18(num_classes=10)
    net.fc = torch.nn.Identity()
    ref, ref_labels = embed(net, ds, batch_size=64, progress=False)
    store = extract(net, ds, tmp_path, batch_size=64, shard_size=100, progress=False)
    assert store.dim == 512 and store.n == 128
    np.testing.assert_array_equal(store.labels, ref_labels)
    assert set(ref_labels.tolist()) == set(range(10))
    cos = (store.to_array() * ref).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(store.to_array(), axis=1)
    assert cos.min() > 0.9999


def _ddp_worker(rank, world, root, port):
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        ds = Tensors(100)
        store = extract(small_model(), ds, root, batch_size=16, shard_size=30, device="cpu", progress=False)
        assert store.n == 100
        # contiguous slices of the 4 shards: rank 0 -> 0, 1; rank 1 -> 2, 3
        assert ds.calls == (60 if rank == 0 else 40), ds.calls
    finally:
        dist.destroy_process_group()


def test_extract_under_torch_distributed_splits_shards(tmp_path):
    """Two gloo ranks: this process is rank 0, a spawned one is rank 1."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = str(tmp_path / "ddp")
    other = multiprocessing.get_context("spawn").Process(target=_ddp_worker, args=(1, 2, root, port))
    other.start()
    try:
        _ddp_worker(0, 2, root, port)
        other.join(60)
        assert other.exitcode == 0, f"rank 1 exited with {other.exitcode}"
    finally:
        if other.is_alive():
            other.kill()
    single = extract(small_model(), Tensors(100), tmp_path / "single", batch_size=16, shard_size=30, progress=False)
    for a in sorted(single.root.glob("shard-*.npy")):
        assert a.read_bytes() == (tmp_path / "ddp" / a.name).read_bytes(), a.name
    assert json.loads((tmp_path / "ddp" / "index.json").read_text())["n"] == 100
