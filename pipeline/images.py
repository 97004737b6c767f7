"""Decoding images with limits: every rejection names its reason."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class ImageRejected(InputError, ValueError):
    """An input that is not a usable image; ``reason`` is a short machine-friendly tag.

    Also a ValueError: tests/test_bundle.py expects one from prepare_bundle."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


MAX_ASPECT_RATIO = 20.0
FORMAT_OF = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}  # content type -> Pillow's format
# What a frame on the stream may be, whatever it declares: Pillow would otherwise open some
# forty formats (BMP, TIFF, ICO, PCX, SGI, DDS, ...), each its own decoder to trust, and hand
# EPS to Ghostscript, an interpreter.
STREAM_FORMATS = tuple(FORMAT_OF.values())


def file_formats() -> tuple[str, ...]:
    """What a local image file (a class example, an evaluation set) may be: any format
    Pillow reads but the ones it hands to an external program."""
    Image.init()
    return tuple(f for f in Image.OPEN if f not in ("EPS",))


def check_dimensions(width: int, height: int, *, max_pixels: int, max_aspect_ratio: float) -> None:
    """Refuse an image by its header's size, before any pixel is decoded (or resized)."""
    if width * height > max_pixels:
        raise ImageRejected("too-many-pixels", f"{width}x{height} > limit {max_pixels} pixels")
    if max(width, height) > max_aspect_ratio * max(1, min(width, height)):
        raise ImageRejected("extreme-aspect-ratio", f"{width}x{height}: sides differ by more than {max_aspect_ratio:g}x")


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, draft_short_side: int | None = None,
                 max_aspect_ratio: float = MAX_ASPECT_RATIO, content_type: str | None = None,
                 formats: tuple[str, ...] | None = STREAM_FORMATS) -> Image.Image:
    """Bytes -> RGB PIL image, upright by its EXIF orientation, checking sizes before the
    pixels are decoded.

    The aspect ratio is bounded too: the preprocessing resizes the shortest side to ~224, so
    a 1 x 60,000 image (a few hundred bytes of PNG, within the pixel limit) would become
    224 x 13 million pixels before the crop. With ``draft_short_side``, a JPEG is decoded at
    the smallest DCT scale that keeps its shortest side at least that long (see
    :mod:`pipeline.preprocess`). With a declared ``content_type``, the bytes must be that format;
    in any case one of ``formats`` (Pillow's names; None: every format Pillow opens).
    """
    if len(data) == 0:
        raise ImageRejected("empty", "zero bytes")
    if len(data) > max_bytes:
        raise ImageRejected("too-large", f"{len(data)} bytes > limit {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
            declared = FORMAT_OF.get(content_type) if content_type is not None else None
            if declared is not None and image.format != declared:
                raise ImageRejected("content-type-mismatch", f"declared {content_type}, the bytes are {image.format or 'unknown'}")
            width, height = image.size
            check_dimensions(width, height, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
            if draft_short_side is not None:
                from pipeline.preprocess import draft_for  # imports torch: listing and checking files must not wait for it

                draft_for(image, draft_short_side)
            return ImageOps.exif_transpose(image).convert("RGB")
    except ImageRejected:
        raise
    except UnidentifiedImageError as exc:
        allowed = f": one of {', '.join(formats)} expected" if formats is not None and len(formats) < 10 else ""
        raise ImageRejected("not-an-image", f"unrecognised image format{allowed}") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too-many-pixels", str(exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected("corrupt", f"{type(exc).__name__}: {exc}") from exc


def load_image_file(path: Path, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Read and decode one file; errors name the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageRejected("too-large", f"{size} bytes > limit {max_bytes}")
        return decode_image(path.read_bytes(), max_bytes=max_bytes, max_pixels=max_pixels, formats=file_formats())
    except ImageRejected as exc:
        raise ImageRejected(exc.reason, f"{path}: {exc.detail}") from exc
    except OSError as exc:
        raise ImageRejected("unreadable", f"{path}: {exc.strerror or exc}") from exc


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by suffix), sorted for reproducibility."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
