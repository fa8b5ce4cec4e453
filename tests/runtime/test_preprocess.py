"""The runtime's Pillow/numpy preprocessing reproduces torchvision's Resize + CenterCrop + Normalize."""

from __future__ import annotations

import numpy as np
import pytest
from kt_edge_runtime.bundle import InputSpec
from kt_edge_runtime.preprocess import load_rgb, preprocess_batch, preprocess_file, preprocess_image
from PIL import Image

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def torchvision_reference(image: Image.Image, spec: InputSpec) -> np.ndarray:
    from torchvision import transforms

    tf = transforms.Compose(
        [
            transforms.Resize(spec.resize),
            transforms.CenterCrop(spec.crop),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )
    return tf(image.convert("RGB")).numpy()


def spec(resize: int, crop: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> InputSpec:
    return InputSpec(shape=(3, crop, crop), resize=resize, crop=crop, mean=mean, std=std)


def imagenette_files(data_root, count: int) -> list:
    root = data_root / "imagenette" / "val"
    if not root.is_dir():
        pytest.skip(f"Imagenette not found under {root} (set KT_EDGE_SHARED_DATA)")
    files = sorted(root.glob("*/*.jpg"))
    return [files[i] for i in np.random.default_rng(3).choice(len(files), count, replace=False)]


@pytest.mark.parametrize(("resize", "crop"), [(128, 112), (64, 56), (160, 160), (73, 64)])
def test_matches_torchvision_on_imagenette(data_root, resize, crop):
    s = spec(resize, crop)
    for f in imagenette_files(data_root, 6):
        ours = preprocess_file(f, s)
        ref = torchvision_reference(Image.open(f), s)
        assert ours.shape == ref.shape == (3, crop, crop) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_matches_torchvision_on_cifar_upscaled(pick_cifar):
    s = spec(40, 36, CIFAR_MEAN, CIFAR_STD)
    files, _ = pick_cifar("test", 8, seed=4)
    batch = preprocess_batch(files, s)
    ref = np.stack([torchvision_reference(Image.open(f), s) for f in files])
    np.testing.assert_allclose(batch, ref, atol=1e-5)


@pytest.mark.parametrize("size", [(50, 37), (37, 50), (101, 64), (33, 33)])
def test_non_square_sizes_and_odd_crop_offsets(size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    s = spec(33, 31)
    np.testing.assert_allclose(preprocess_image(image, s), torchvision_reference(image, s), atol=1e-5)


def test_close_to_torchvision_tensor_antialias_path(data_root):
    """Tensor-path Resize(antialias=True) differs from PIL only by rounding to uint8."""
    import torch
    from torchvision.transforms import v2

    s = spec(64, 56)
    f = imagenette_files(data_root, 1)[0]
    image = Image.open(f).convert("RGB")
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    tf = v2.Compose([v2.Resize(64, antialias=True), v2.CenterCrop(56), v2.Normalize(s.mean, s.std)])
    ref = tf(tensor).numpy()
    ours = preprocess_file(f, s)
    assert np.abs(ours - ref).mean() < 0.02  # about 1/255 / std on average


def image_files(folder) -> dict[str, np.ndarray]:
    """Every mode the decoder handles, written to disk, with the 8-bit RGB each must decode to."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    alpha = rng.integers(0, 256, gray.shape, dtype=np.uint8)
    white = np.full_like(rgb, 255)

    def over_white(colour, a):
        a = a[..., None].astype(np.float64) / 255.0
        return colour * a + white * (1.0 - a)

    expected = {}
    Image.fromarray(rgb).save(folder / "rgb.png")
    expected["rgb.png"] = rgb
    Image.fromarray(gray, "L").save(folder / "gray.png")
    expected["gray.png"] = np.repeat(gray[..., None], 3, axis=2)
    Image.fromarray(np.dstack([gray, alpha]), "LA").save(folder / "gray-alpha.png")
    expected["gray-alpha.png"] = over_white(np.repeat(gray[..., None], 3, axis=2), alpha)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / "alpha.png")
    expected["alpha.png"] = over_white(rgb, alpha)
    palette = Image.fromarray(rgb).quantize(16)
    palette.info["transparency"] = 3
    palette.save(folder / "palette.png", transparency=3)
    index = np.asarray(palette)
    colours = np.asarray(palette.convert("RGB"))
    expected["palette.png"] = np.where((index == 3)[..., None], white, colours)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = rgb  # JPEG: compared loosely
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "sixteen.png")
    expected["sixteen.png"] = np.repeat(gray[..., None], 3, axis=2)  # full 16-bit range, scaled by 257
    Image.fromarray(gray.astype(np.uint16)).save(folder / "sixteen-holding-8.png")
    expected["sixteen-holding-8.png"] = np.repeat(gray[..., None], 3, axis=2)  # 8-bit values: not darkened
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    rotated.save(folder / "exif-rotated.png", exif=exif)
    expected["exif-rotated.png"] = np.rot90(rgb, k=-1)
    return {name: np.rint(value).astype(np.uint8) for name, value in expected.items()}


def test_every_image_mode_decodes_to_its_upright_rgb(tmp_path):
    for name, expected in image_files(tmp_path).items():
        decoded = np.asarray(load_rgb(tmp_path / name))
        assert decoded.shape == expected.shape, name
        if name.endswith(".jpg"):
            assert np.abs(decoded.astype(int) - expected).mean() < 12, name
        else:
            assert np.abs(decoded.astype(int) - expected).max() <= 1, name


def test_host_and_device_decode_every_file_to_equal_tensors(tmp_path):
    """Training reads images through kt_edge.data.sources, the device through kt_edge_runtime: same tensors."""
    from kt_edge.data.augment import MEAN, STD, eval_transform, resize_for
    from kt_edge.data.sources import load_rgb as host_load_rgb

    spec = InputSpec(shape=(3, 16, 16), resize=resize_for(16), crop=16, mean=MEAN, std=STD)
    host = eval_transform(16)
    for name in image_files(tmp_path):
        device_x = preprocess_file(tmp_path / name, spec)
        host_x = host(host_load_rgb(tmp_path / name)).numpy()
        np.testing.assert_allclose(device_x, host_x, atol=1e-5, err_msg=name)


def test_unreadable_image_is_an_error_and_extreme_aspect_works(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        preprocess_file(
            tmp_path / "broken.jpg", InputSpec(shape=(3, 8, 8), resize=8, crop=8, mean=(0, 0, 0), std=(1, 1, 1))
        )
    tiny = InputSpec(shape=(3, 8, 8), resize=8, crop=8, mean=(0, 0, 0), std=(1, 1, 1))
    wide = Image.new("RGB", (100, 2))
    out = preprocess_image(wide, tiny)  # shorter side scaled up to 8, then cropped
    assert out.shape == (3, 8, 8)
