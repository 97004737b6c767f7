"""Decoding with limits: every bad input is refused with a reason."""
import io

import pytest
from PIL import Image

from pipeline.images import ImageRejected, decode_image, load_image_file

LIMITS = dict(max_bytes=1_000_000, max_pixels=1_000_000)


def encoded(size=(64, 48), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_good_images_decode_to_rgb(fmt):
    image = decode_image(encoded(fmt=fmt), **LIMITS)
    assert image.mode == "RGB" and image.size == (64, 48)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello, not an image", "not-an-image"),
        (encoded()[:200], "corrupt"),
        (b"x" * 1_000_001, "too-large"),
        (encoded(size=(2000, 1000), fmt="PNG"), "too-many-pixels"),
    ],
)
def test_bad_inputs_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageRejected) as info:
        decode_image(data, **LIMITS)
    assert info.value.reason == reason


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ImageRejected, match="missing.jpg"):
        load_image_file(tmp_path / "missing.jpg", **LIMITS)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(ImageRejected, match="bad.jpg: unrecognised"):
        load_image_file(bad, **LIMITS)


def test_an_extreme_aspect_ratio_is_refused_before_the_resize_could_explode_it():
    strip = encoded(size=(2100, 100), fmt="PNG")  # 21:1, 210,000 pixels: within the pixel limit
    with pytest.raises(ImageRejected) as info:
        decode_image(strip, **LIMITS)
    assert info.value.reason == "extreme-aspect-ratio" and "2100x100" in info.value.detail
    assert decode_image(encoded(size=(1900, 100), fmt="PNG"), **LIMITS).size == (1900, 100)  # 19:1 passes
    assert decode_image(strip, **LIMITS, max_aspect_ratio=25).size == (2100, 100)


def test_exif_orientation_turns_the_image_upright():
    image = Image.new("RGB", (64, 48), (10, 120, 200))
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    upright = decode_image(buffer.getvalue(), **LIMITS)
    assert upright.size == (48, 64)  # turned as a viewer shows it
    assert upright.getpixel((47, 0)) == (255, 0, 0)  # the top-left pixel now at the top right


def test_the_declared_content_type_must_match_the_bytes():
    with pytest.raises(ImageRejected) as info:
        decode_image(encoded(fmt="PNG"), **LIMITS, content_type="image/jpeg")
    assert info.value.reason == "content-type-mismatch" and info.value.detail == "declared image/jpeg, the bytes are PNG"
    assert decode_image(encoded(fmt="PNG"), **LIMITS, content_type="image/png").size == (64, 48)
    assert decode_image(encoded(fmt="WEBP"), **LIMITS).size == (64, 48)  # nothing declared: any supported format


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF", "PPM", "TGA", "PCX", "SGI", "DDS"])
def test_a_frame_is_jpeg_png_or_webp_whatever_else_pillow_could_open(fmt, tmp_path):
    """Found by the generated hostile records: without a content-type, BMP, TIFF, ICO ... frames were
    decoded (each format a decoder of its own to trust); a local file may still be any of them."""
    data = encoded(fmt=fmt)
    with pytest.raises(ImageRejected) as info:
        decode_image(data, **LIMITS)
    assert info.value.reason == "not-an-image" and "JPEG, PNG, WEBP" in info.value.detail
    path = tmp_path / f"example.{fmt.lower()}"
    path.write_bytes(data)
    assert load_image_file(path, **LIMITS).size == (64, 48)


def test_eps_is_never_handed_to_ghostscript(tmp_path):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    path = tmp_path / "x.eps"
    path.write_bytes(eps)
    for decode in (lambda: decode_image(eps, **LIMITS), lambda: load_image_file(path, **LIMITS)):
        with pytest.raises(ImageRejected) as info:
            decode()
        assert info.value.reason == "not-an-image"
