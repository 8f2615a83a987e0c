"""The one preprocessing definition shared by training and serving.

Decode -> RGB -> resize shorter side -> centre crop -> normalize -> layout. The numbers live in a
`PreprocessSpec` that is stored in every bundle, so serving never guesses them; `layout` and `scale`
let imported models (Keras: NHWC, raw 0-255 pixels) say what they expect. Only numpy and Pillow are
imported here: the serving side depends on this module.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from food_classifier.defaults import MAX_PIXELS

ImageInput = str | Path | bytes | bytearray | memoryview | Image.Image

PIPELINE_VERSION = 2  # bump when the pixels change (feature caches are keyed by it)
DEFAULT_MAX_PIXELS = MAX_PIXELS  # decoded pixels, ~ 6300x6300 (defaults.py)
# Decoded on purpose, and nothing else (EPS would hand client bytes to Ghostscript; AVIF, JPEG 2000, PSD,
# ICO... are parsers a food photo does not need). "JPEG" includes the multi-picture JPEGs (MPO) many
# cameras and phones write.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ORIENTATION = 0x0112  # the EXIF tag
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
LAYOUTS = ("NCHW", "NHWC")


class ImageError(ValueError):
    """Input that is not a usable image; `reason` is a short machine-readable tag."""

    reason = "invalid_image"


class ImageDecodeError(ImageError):
    reason = "invalid_image"


class ImageTooLarge(ImageError):
    reason = "too_many_pixels"


@dataclass(frozen=True)
class PreprocessSpec:
    """x = (pixel / 255 * scale - mean) / std, laid out as `layout` (without the batch axis).

    `scale` is the input range the model was trained on: 1.0 (pixels in [0, 1], every trained bundle)
    or 255.0 (raw pixels, e.g. a Keras model that rescales inside); mean and std are in that range.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    layout: str = "NCHW"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"preprocessing layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if not self.scale > 0:
            raise ValueError(f"preprocessing scale must be positive, got {self.scale!r}")

    def to_dict(self) -> dict:
        """The bundle's `preprocessing` section; layout and scale only when not the defaults, so
        bundles that do not need them are written exactly as before."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        for k in ("layout", "scale"):
            if d[k] == getattr(PreprocessSpec, k):
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        known = {k: d[k] for k in ("resize", "crop", "interpolation", "layout") if k in d}
        if "scale" in d:
            known["scale"] = float(d["scale"])
        return cls(mean=tuple(d.get("mean", cls.mean)), std=tuple(d.get("std", cls.std)), **known)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One image's tensor shape (the model input without its batch axis)."""
        return (3, self.crop, self.crop) if self.layout == "NCHW" else (self.crop, self.crop, 3)

    @property
    def key(self) -> str:
        """Stable text id, used in feature-cache keys."""
        m = ",".join(f"{v:g}" for v in self.mean)
        s = ",".join(f"{v:g}" for v in self.std)
        extra = "" if (self.layout, self.scale) == ("NCHW", 1.0) else f"-{self.layout}-x{self.scale:g}"
        return f"p{PIPELINE_VERSION}-r{self.resize}-c{self.crop}-{self.interpolation}-m{m}-s{s}{extra}"


def open_image(src: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> Image.Image:
    """Open any accepted input as an RGB image, refusing bombs before the pixels are decoded.

    `draft` lets the JPEG decoder downscale by 2/4/8 for free while both sides stay >= draft.
    """
    return load_rgb(peek_image(src, max_pixels, draft))


def peek_image(src: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> Image.Image:
    """Read only the header: an allowed format, at most `max_pixels` *decoded* pixels (after the JPEG
    draft, so a 48 MP photo that decodes at 1/8 scale passes), pixels not decoded yet."""
    if isinstance(src, Image.Image):
        img = src
    else:
        try:
            if isinstance(src, (bytes, bytearray, memoryview)):
                if len(src) == 0:
                    raise ImageDecodeError("empty image data")
                img = Image.open(io.BytesIO(bytes(src)), formats=ALLOWED_FORMATS)
            else:
                path = Path(src)
                if not path.is_file():
                    raise ImageDecodeError(f"no such image file: {path}")
                img = Image.open(path, formats=ALLOWED_FORMATS)
        except ImageError:
            raise
        except Image.DecompressionBombError:  # Pillow's own hard limit, far above ours: quote ours
            raise ImageTooLarge(f"image has more pixels than the limit of {max_pixels:,}") from None
        except UnidentifiedImageError:
            raise ImageDecodeError("not a readable image (or not one of the accepted formats: "
                                   f"{', '.join(ALLOWED_FORMATS)})") from None
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any parser failure on client data is a bad image
            raise ImageDecodeError(f"not a readable image ({e.__class__.__name__})") from None
    w, h = img.size
    if draft:
        img.draft("RGB", (draft, draft))  # JPEG only (a no-op elsewhere); `size` becomes the decoded size
    dw, dh = img.size
    if dw * dh > max_pixels:
        scaled = f" (decoded at {dw}x{dh})" if (dw, dh) != (w, h) else ""
        raise ImageTooLarge(f"image is {w}x{h}{scaled} = {dw * dh:,} pixels, limit is {max_pixels:,}")
    if dw < 1 or dh < 1:
        raise ImageDecodeError("image has no pixels")
    return img


def decode_bytes(img: Image.Image) -> int:
    """Estimated peak memory of `load_rgb` on a peeked image: Pillow keeps 1-bit, L and P images in 1
    byte a pixel, 16-bit in 2, everything else (RGB too) in 4; converting adds the 4-byte RGB copy,
    palette transparency an RGBA step, 16-bit/float an 8-bit step."""
    w, h = img.size
    mode = img.mode
    per = {"1": 1, "L": 1, "P": 1}.get(mode, 2 if mode.startswith("I;16") else 4)
    if mode != "RGB":
        per += 4
    if mode in ("P", "PA"):
        per += 4
    if mode.startswith("I") or mode == "F":
        per += 6
    return w * h * per


def load_rgb(img: Image.Image) -> Image.Image:
    """Decode a peeked image to RGB, turned upright by its EXIF orientation."""
    try:
        if img.getexif().get(ORIENTATION, 1) != 1:  # exif_transpose would copy even an upright image
            img = ImageOps.exif_transpose(img)
        if img.mode != "RGB":
            img = _to_rgb(img)
        img.load()
    except ImageError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data fails in many ways inside the plugins
        raise ImageDecodeError(f"image data is corrupt or truncated ({e.__class__.__name__})") from None
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Composite transparency on white so PNG cut-outs do not turn black; 16-bit and float grey scaled
    to 8 bits (Pillow's own conversion clips them, so a 16-bit photo came out white)."""
    if img.mode == "PA" or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, (0, 0), img)  # the image is its own mask (its alpha band): no extra copy
        return bg
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img)
        if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
            a = np.clip(a, 0, 65535) / 257.0
        elif img.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def resize_crop(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Resize the shorter side to `spec.resize`, then take the centre `spec.crop` square.

    Done as one resize of just the source window that the crop keeps: the same pixels for far
    less work than resizing the whole image and throwing the margins away.
    """
    w, h = img.size
    side = spec.crop * min(w, h) / spec.resize  # the crop window, in source pixels
    left, top = (w - side) / 2, (h - side) / 2
    return img.resize((spec.crop, spec.crop), _RESAMPLE[spec.interpolation],
                      box=(left, top, left + side, top + side))


def normalize(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """HWC uint8 image -> CHW (or HWC) float32 (x/255*scale - mean)/std, in one conversion and
    in-place ops (2.5x faster)."""
    std = np.asarray(spec.std, dtype=np.float32)
    scale = spec.scale / (std * 255.0)
    bias = -np.asarray(spec.mean, dtype=np.float32) / std
    if spec.layout == "NHWC":
        x = np.asarray(img).astype(np.float32, order="C")
    else:
        x = np.asarray(img).transpose(2, 0, 1).astype(np.float32, order="C")
        scale, bias = scale[:, None, None], bias[:, None, None]
    x *= scale
    x += bias
    return x


def preprocess(src: ImageInput, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The full eval-time pipeline: any input -> float32 `spec.input_shape`, ready for the model."""
    img = open_image(src, max_pixels=max_pixels, draft=spec.resize)
    return normalize(resize_crop(img, spec), spec)


def peek(src: ImageInput, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`preprocess`'s first step alone (header, format, pixel limit, the same JPEG draft), so a server can
    weigh an image (`decode_bytes`) before spending memory on it; `preprocess` accepts the result."""
    return peek_image(src, max_pixels, draft=spec.resize)
