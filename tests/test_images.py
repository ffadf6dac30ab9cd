"""Writing samples and reading init images: concurrent writers, 16-bit images, oversized images."""
import numpy as np
import pytest
from PIL import Image

from sdgen.images import MAX_INIT_PIXELS, SampleWriter, load_init_image
from sdgen.runtime import UsageError


def solid(value):
    return np.full((8, 8, 3), value, dtype=np.uint8)


def test_two_writers_on_one_folder_take_different_numbers(tmp_path, capsys):
    first = SampleWriter(str(tmp_path), {"run": "a"})
    second = SampleWriter(str(tmp_path), {"run": "b"})  # both start counting at 0, as two runs started together
    first.add([solid(10), solid(20)])
    second.add([solid(30), solid(40)])
    first.finish(2)
    second.finish(2)
    samples = sorted((tmp_path / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert [int(np.asarray(Image.open(p))[0, 0, 0]) for p in samples] == [10, 20, 30, 40]
    assert sorted(p.name for p in tmp_path.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    assert Image.open(tmp_path / "samples" / "00002.png").text["run"] == "b"


def test_sixteen_bit_grayscale_init_image_keeps_its_tones(tmp_path):
    ramp = np.linspace(0, 65535, 128 * 128).reshape(128, 128).astype(np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_init_image(path)
    assert image.shape == (1, 3, 128, 128)
    assert torch_equal_channels(image)
    expected = 2.0 * ramp.astype(np.float64) / 65535.0 - 1.0
    assert np.abs(image[0, 0].double().numpy() - expected).max() < 1e-3
    assert abs(float(image.mean())) < 0.01  # a ramp averages to mid-gray, not white


def torch_equal_channels(image):
    return bool((image[:, 0] == image[:, 1]).all() and (image[:, 1] == image[:, 2]).all())


def test_oversized_init_image_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    side = int(MAX_INIT_PIXELS ** 0.5) + 64
    Image.new("L", (side, side)).save(path)
    with pytest.raises(UsageError, match=rf"{side}x{side} .*megapixels.*resize it first"):
        load_init_image(path)
