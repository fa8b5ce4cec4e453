"""A tiny real bundle for runtime tests: CIFAR-stem ResNet-18 at 32 px, exported fp32/fp16/int8.

The network has random weights but BatchNorm statistics fitted on real CIFAR-10
images, so activations have realistic ranges for int8 calibration. Built once
per session; tests that modify a bundle work on a copy.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
INPUT_NAME, OUTPUT_NAME = "images", "embedding"
GOLDEN, CALIBRATION = 16, 64


def shared_data() -> Path:
    return Path(os.environ.get("KT_EDGE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def cifar_files(split: str, count: int, seed: int) -> tuple[list[Path], np.ndarray]:
    """A seeded, class-balanced-ish subset of CIFAR-10 image files and their labels."""
    root = shared_data() / "cifar10" / split
    if not root.is_dir():
        pytest.skip(f"CIFAR-10 not found under {root} (set KT_EDGE_SHARED_DATA)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, label) for label, c in enumerate(classes) for f in sorted((root / c).iterdir())]
    pick = np.random.default_rng(seed).choice(len(files), count, replace=False)
    return [files[i][0] for i in pick], np.array([files[i][1] for i in pick])


def torch_preprocess(files: list[Path], resize: int = 32, crop: int = 32) -> np.ndarray:
    """The reference preprocessing, torchvision's, that the runtime must reproduce."""
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )
    return np.stack([tf(Image.open(f).convert("RGB")).numpy() for f in files]).astype(np.float32)


def tiny_resnet(fit_bn_on: np.ndarray):
    """ResNet-18 with a CIFAR stem and no classifier (512-d embedding), BN fitted on real images."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()
    model.fc = torch.nn.Identity()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the fitting batches
    model.train()
    with torch.no_grad():
        for chunk in np.array_split(fit_bn_on, 2):
            model(torch.from_numpy(chunk))
    return model.eval()


def export_onnx(model, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter announces its retirement
        torch.onnx.export(
            model,
            (torch.zeros(2, 3, 32, 32),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def make_bundle(root: Path) -> Path:
    """Write a complete, hashed bundle with fp32, fp16 and int8 models under root."""
    import torch
    from kt_edge_runtime.bundle import Golden, InputSpec, Manifest, ModelEntry, OutputSpec, Parity, write_manifest
    from kt_edge_runtime.parity import DEFAULT_THRESHOLDS

    from kt_edge.export.quantize import to_fp16, to_int8

    golden_files, _ = cifar_files("test", GOLDEN, seed=1)
    calib_files, _ = cifar_files("train", CALIBRATION, seed=2)
    golden_x = torch_preprocess(golden_files)
    calib_x = torch_preprocess(calib_files)
    model = tiny_resnet(calib_x)
    with torch.no_grad():
        golden_y = model(torch.from_numpy(golden_x)).numpy().astype(np.float32)

    (root / "golden" / "images").mkdir(parents=True)
    np.save(root / "golden" / "inputs.npy", golden_x)
    np.save(root / "golden" / "outputs.npy", golden_y)
    images = []
    for i, f in enumerate(golden_files):
        rel = f"golden/images/{i:02d}{f.suffix}"
        shutil.copyfile(f, root / rel)
        images.append(rel)
    export_onnx(model, root / "model.fp32.onnx")
    to_fp16(root / "model.fp32.onnx", root / "model.fp16.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 64 calibration images: the small-set warning is expected here
        quantization = to_int8(root / "model.fp32.onnx", root / "model.int8.onnx", calib_x)

    manifest = Manifest(
        architecture="resnet18-cifar",
        input=InputSpec(shape=(3, 32, 32), resize=32, crop=32, mean=CIFAR_MEAN, std=CIFAR_STD),
        output=OutputSpec(name=OUTPUT_NAME, dim=512, normalized=False),
        models={
            p: ModelEntry(
                file=f"model.{p}.onnx",
                input_name=INPUT_NAME,
                output_name=OUTPUT_NAME,
                quantization=quantization if p == "int8" else None,
            )
            for p in ("fp32", "fp16", "int8")
        },
        golden=Golden(inputs="golden/inputs.npy", outputs="golden/outputs.npy", images=tuple(images)),
        parity=Parity(thresholds=dict(DEFAULT_THRESHOLDS)),
        verified=True,
        provenance={"method": "test", "weights": "random init, BatchNorm fitted on 64 CIFAR-10 train images"},
        created="2024-01-01T00:00:00+00:00",
        kt_edge_version="test",
    )
    write_manifest(root, manifest)
    return root


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared image data folder (KT_EDGE_SHARED_DATA)."""
    return shared_data()


@pytest.fixture(scope="session")
def pick_cifar():
    """cifar_files(split, count, seed) for tests: seeded CIFAR-10 files and labels, or a skip."""
    return cifar_files


@pytest.fixture(scope="session")
def calibration() -> np.ndarray:
    """The preprocessed CIFAR-10 train images the bundle's int8 model was calibrated on (kept off the bundle)."""
    return torch_preprocess(cifar_files("train", CALIBRATION, seed=2)[0])


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """A pristine bundle; do not modify it (use bundle_copy)."""
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture
def bundle_copy(bundle, tmp_path) -> Path:
    """A private copy of the bundle that a test may tamper with."""
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))
