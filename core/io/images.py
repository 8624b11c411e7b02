"""Image decoding with the checks curation needs: corrupt/truncated files and decompression bombs
become `SampleError`s (ledger reasons), never warnings or crashes."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from core.foundation.sample import SampleError

# Pillow's own default (about 89.5 MP). Above it Pillow only *warns*; we make it an error.
DEFAULT_MAX_PIXELS = 89_478_485
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
EXT_FORMAT = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF"}
IMAGE_EXTS = frozenset(EXT_FORMAT)


def sniff_format(data: bytes) -> str:
    """Image format from magic bytes ("JPEG", "PNG", ...), or "" when unknown. Cheap: no decode."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return ""


def image_ext(data: bytes, fallback_name: str = "") -> str:
    """WDS member extension for encoded image bytes (from the content, not the file name)."""
    fmt = sniff_format(data)
    if fmt:
        return FORMAT_EXT[fmt]
    ext = fallback_name.rsplit(".", 1)[-1].lower() if "." in fallback_name else ""
    return ext if ext in IMAGE_EXTS else "bin"


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_side: int = 0) -> Image.Image:
    """Fully decode encoded image bytes to an RGB PIL image.

    Raises SampleError("decompression_bomb") when width*height exceeds `max_pixels` (checked from the
    header, before any pixel is decoded) and SampleError("corrupt_image") for unreadable or truncated data.
    `draft_side` > 0 lets a JPEG decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides
    >= draft_side: several times cheaper when a model resizes to that side anyway (same checks).
    """
    if not data:
        raise SampleError("corrupt_image", "empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise SampleError("decompression_bomb", f"{w}x{h} = {w * h} px > {max_pixels}")
            if draft_side and im.format == "JPEG":
                im.draft("RGB", (draft_side, draft_side))
            im.load()
            return im if im.mode == "RGB" else im.convert("RGB")  # convert() to the same mode only copies
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError("decompression_bomb", str(e)) from None
    except UnidentifiedImageError as e:  # Pillow's message ends with the buffer's repr, a memory address
        raise SampleError("corrupt_image", f"{type(e).__name__}: {str(e).split(' <_io.')[0]}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise SampleError("corrupt_image", f"{type(e).__name__}: {e}") from None
