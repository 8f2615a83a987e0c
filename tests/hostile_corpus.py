"""The hostile-input corpus: bad files, files Pillow knows but the service must not decode, and odd but
valid images that must still work. Built in memory, deterministic, small (the whole set is ~1 MB).

Each entry: name -> (bytes, expected status, expected error code or the expected label for a 200).
"""

from __future__ import annotations

import base64
import io
import struct
import zipfile
import zlib

import numpy as np
from conftest import colour_image, image_bytes
from PIL import Image

MAX_PIXELS = 20_000_000  # the hostile server's --max-pixels (keeps the "large but allowed" cases quick)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_raw(width: int, height: int, depth: int, colour_type: int, rows: bytes, crc_ok: bool = True) -> bytes:
    """A PNG written by hand, for what Pillow will not write (48-bit colour, lying headers, bad CRCs)."""
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0))
    if not crc_ok:
        ihdr = ihdr[:-4] + b"\x00\x00\x00\x00"
    idat = _png_chunk(b"IDAT", zlib.compress(rows, 9))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + _png_chunk(b"IEND", b"")


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims width x height (the data is 1 row)."""
    return png_raw(width, height, 8, 2, b"\x00" + b"\x00" * 3 * min(width, 64))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG with its SOF0 size patched: the header lies, the data does not follow."""
    data = bytearray(image_bytes(colour_image("red", size=(16, 16))))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF whose screen and only frame claim width x height, with one byte of pixel data."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def gif_frames(n: int) -> bytes:
    frames = [colour_image("green", size=(24, 24), seed=i).convert("P") for i in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)
    return buf.getvalue()


def apng(n: int) -> bytes:
    frames = [colour_image("blue", size=(40, 30), seed=i) for i in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _with_exif_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return saved(colour_image("red", size=(90, 60)), "JPEG", exif=exif)


def _corrupt_exif() -> bytes:
    data = image_bytes(colour_image("green", size=(64, 48)))
    app1 = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + b"\xff\xff" + b"\x01" * 40  # 65535 entries, 40 bytes
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pie.jpg", image_bytes(colour_image("red")))
    return buf.getvalue()


def corpus() -> dict[str, tuple[bytes, int, str]]:
    red, green, blue = (colour_image(c, size=(64, 48)) for c in ("red", "green", "blue"))
    jpeg = image_bytes(colour_image("red", size=(300, 200)))
    rng = np.random.default_rng(7)
    grey16 = (np.full((40, 50), 50000, np.uint16) + rng.integers(0, 500, (40, 50))).astype(np.uint16)
    rgb48 = b"".join(b"\x00" + np.tile(np.array([8000, 9000, 60000], ">u2"), 30).tobytes() for _ in range(20))
    rgba = red.convert("RGBA")
    rgba.putalpha(200)
    pal = green.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    cmyk = Image.new("CMYK", (40, 30), (0, 230, 230, 20))  # red in ink
    bad = {
        "empty": (b"", 422, "missing_image"),
        "truncated_jpeg": (jpeg[: len(jpeg) * 2 // 5], 415, "invalid_image"),
        "jpeg_soi_eoi_only": (b"\xff\xd8\xff\xd9", 415, "invalid_image"),
        "jpeg_header_only": (jpeg[:300], 415, "invalid_image"),
        "random_bytes": (rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), 415, "invalid_image"),
        "zeros": (b"\x00" * 4096, 415, "invalid_image"),
        "png_bad_ihdr_crc": (png_raw(8, 8, 8, 2, b"".join(b"\x00" + b"\x10" * 24 for _ in range(8)), crc_ok=False),
                        415, "invalid_image"),
        "png_truncated_after_ihdr": (png_claiming(64, 64)[:33], 415, "invalid_image"),
        "png_zero_size": (png_raw(0, 0, 8, 2, b""), 415, "invalid_image"),
        "png_claims_30000x30000": (png_claiming(30000, 30000), 413, "too_many_pixels"),
        "png_claims_5000x5000_over_limit": (png_claiming(5000, 5000), 413, "too_many_pixels"),
        "png_bomb_1bit_8000x8000": (saved(Image.new("1", (8000, 8000)), "PNG"), 413, "too_many_pixels"),
        "jpeg_claims_65000x65000": (jpeg_claiming(65000, 65000), 413, "too_many_pixels"),
        "gif_claims_65535x65535": (gif_claiming(65535, 65535), 413, "too_many_pixels"),
        "bmp_claims_huge": (saved(red, "BMP")[:18] + struct.pack("<ii", 60000, 60000) + saved(red, "BMP")[26:],
                            413, "too_many_pixels"),
        "eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n"
                b"showpage\n%%EOF\n", 415, "invalid_image"),
        "eps_pillow_wrote": (saved(red, "EPS"), 415, "invalid_image"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10" '
                b'fill="red"/></svg>', 415, "invalid_image"),
        "pdf": (saved(red, "PDF"), 415, "invalid_image"),
        "html": (b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>", 415, "invalid_image"),
        "zip": (_zip(), 415, "invalid_image"),
        "ico_not_allowed": (saved(red, "ICO"), 415, "invalid_image"),
        "tga_not_allowed": (saved(red, "TGA"), 415, "invalid_image"),
        "ppm_not_allowed": (saved(red, "PPM"), 415, "invalid_image"),
        "pcx_not_allowed": (saved(red, "PCX"), 415, "invalid_image"),
        "gifar_polyglot": (saved(red.convert("P"), "GIF")[:20] + _zip(), 415, "invalid_image"),
        "base64_text_sent_as_bytes": (base64.b64encode(jpeg), 415, "invalid_image"),
        "utf16_text": ("not an image".encode("utf-16"), 415, "invalid_image"),
    }
    good = {
        "gif_1000_frames": (gif_frames(1000), 200, "green"),
        "apng_30_frames": (apng(30), 200, "blue"),
        "cmyk_jpeg": (saved(cmyk, "JPEG"), 200, "red"),
        "grey_16bit_png": (saved(Image.fromarray(grey16), "PNG"), 200, "green"),  # light grey: any label
        "rgb_48bit_png": (png_raw(30, 20, 16, 2, rgb48), 200, "blue"),
        "rgba_png": (saved(rgba, "PNG"), 200, "red"),
        "palette_png_transparency": (saved(pal, "PNG"), 200, "green"),
        "la_png": (saved(blue.convert("LA"), "PNG"), 200, "blue"),  # grey: any label
        "bilevel_bmp": (saved(blue.convert("1"), "BMP"), 200, "blue"),
        "tiff_rgb": (saved(blue, "TIFF"), 200, "blue"),
        "tiff_16bit_grey": (saved(Image.fromarray(grey16), "TIFF"), 200, "green"),
        "webp": (saved(green, "WEBP"), 200, "green"),
        "jpeg_exif_rotated": (_with_exif_orientation(6), 200, "red"),
        "jpeg_corrupt_exif": (_corrupt_exif(), 200, "green"),
        "one_pixel": (saved(Image.new("RGB", (1, 1), (30, 40, 220)), "PNG"), 200, "blue"),
        "very_wide_4000x2": (saved(Image.new("RGB", (4000, 2), (30, 200, 40)), "PNG"), 200, "green"),
        "large_allowed_4000x4000": (saved(Image.new("RGB", (4000, 4000), (220, 30, 30)), "PNG"), 200, "red"),
    }
    return bad | good


# colourless: the label is arbitrary, the 200 is not
GREY = {"grey_16bit_png", "la_png", "tiff_16bit_grey", "bilevel_bmp"}
