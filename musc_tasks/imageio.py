"""Decoding one product photo safely: every failure becomes an ImageReadError with a reason.

A nightly batch must not stop on one bad file, and an operator must be able to read why a
file was skipped, so each refusal carries a short human sentence ("zero-byte file",
"truncated PNG data", "unsupported format 'GIF'", ...).

Decisions a caller must know
----------------------------
* Only PNG, JPEG (including multi-picture JPEG, first frame), BMP and TIFF are accepted,
  whatever the file suffix says; the format is sniffed from the bytes.
* The declared size is checked against ``max_pixels`` before any pixel is decoded. We call
  the format's PIL opener ourselves so that this check is ours; PIL's own bomb check stays
  only as a backstop for limits above its own, and its warning is silenced.
* EXIF orientation is respected: the returned image is upright as a viewer shows it, so the
  masks and heatmaps written for it overlay the photo the way a person sees the part.
* Alpha is dropped (``convert("RGB")``, as the reference pipeline does), not composited.
* 16-bit grey is scaled by the type's full range (divided by 257), never min-max stretched,
  so a dark frame stays dark. Float ("F") images are refused: they have no fixed range.
* Truncation is detected only while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` stays False.
* ``read_rgb_reduced`` is ``read_rgb`` for a caller that needs the image only at a bounded
  size (``bounded_size``): a JPEG is decoded at a reduced DCT scale (1/2, 1/4 or 1/8, PIL's
  ``draft``), which still runs the entropy decoder over the whole file, so every check and
  reason above holds. Other formats have no reduced decode and are decoded whole.
"""

from __future__ import annotations

import errno
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from .identity import file_digest

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "ImageReadError",
    "bounded_size",
    "content_hash",
    "read_rgb",
    "read_rgb_reduced",
]

log = logging.getLogger(__name__)

# Twice PIL's default MAX_IMAGE_PIXELS: the point where PIL itself refuses to open.
DEFAULT_MAX_PIXELS = 178_956_970

ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")

# PIL names a JPEG with several pictures (phone cameras write these) "MPO"; we read its first.
_FORMAT_FAMILY = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "BMP": "BMP", "TIFF": "TIFF"}

# EXIF orientations that swap width and height (a transpose or a quarter turn).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)

# PIL sniffs formats from the first 16 bytes; reading the same keeps our detection identical.
_PREFIX_BYTES = 16

_TEXT_SNIFF_BYTES = 4096


class ImageReadError(ValueError):
    """A file that cannot be used as an image, and why.

    Attributes
    ----------
    path : str
        The file as given (``os.fsdecode`` form).
    reason : str
        A short human sentence, e.g. ``"truncated PNG data"``.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fsdecode(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # Dask and Prefect pickle exceptions; the default would call __init__ with one argument.
        return (type(self), (self.path, self.reason))


def read_rgb(
    path: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
) -> tuple[Image.Image, list[str]]:
    """Decode an image file fully into an upright 8-bit RGB image.

    Parameters
    ----------
    path : str or path-like
        A PNG, JPEG, BMP or TIFF file (the suffix is not trusted).
    max_pixels : int
        Largest declared width * height accepted; checked before decoding (bomb guard).
    min_side : int
        Smallest width or height accepted.

    Returns
    -------
    image : (S_h, S_w) RGB PIL image
        Detached from the file; EXIF orientation applied, alpha dropped.
    notes : list of str
        What was done to get there, e.g. ``"converted from I;16 to RGB"``,
        ``"EXIF orientation 6 applied"``; empty for a plain upright RGB file.

    Raises
    ------
    ImageReadError
        For any file that cannot be read, identified, accepted or decoded.
    """
    image, _, notes = _read(path, max_pixels=max_pixels, min_side=min_side, long_side=None)
    return image, notes


def bounded_size(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """An image size scaled so that its long side is at most ``long_side``; never enlarged.

    Parameters
    ----------
    size : (width, height)
    long_side : int
        Largest long side in pixels.

    Returns
    -------
    bounded : (width, height)
        ``size`` itself when it fits, otherwise each side times ``long_side / max(size)``,
        rounded, at least 1.
    """
    width, height = size
    scale = long_side / max(width, height)
    if scale >= 1.0:
        return size
    return max(1, round(width * scale)), max(1, round(height * scale))


def read_rgb_reduced(
    path: str | os.PathLike,
    long_side: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
) -> tuple[Image.Image, tuple[int, int], list[str]]:
    """Decode an image for use at a bounded size: ``read_rgb`` at a reduced JPEG scale.

    A JPEG is decoded at the smallest DCT scale (1/2, 1/4 or 1/8 of each side) whose upright
    size is still at least ``bounded_size(full_size, long_side)`` (PIL's ``draft``, asked in
    the file's stored orientation): at 1/2 a fraction of the cost of a full decode. Other
    formats, and images within ``long_side``, are decoded at full size. The caller resizes
    the image to the bounded size. The declared size is checked, a truncated or corrupt file
    refused with the same reasons, EXIF orientation applied and modes converted as by
    ``read_rgb``.

    Parameters
    ----------
    path : str or path-like
        A PNG, JPEG, BMP or TIFF file (the suffix is not trusted).
    long_side : int
        The long side the caller will bound the image to.
    max_pixels, min_side : int
        As in ``read_rgb``: checked on the full declared size before decoding.

    Returns
    -------
    image : RGB PIL image
        Upright, detached from the file; each side at least the bounded size's.
    full_size : (width, height)
        The upright size of the image at full resolution (what ``read_rgb`` returns).
    notes : list of str
        As ``read_rgb``'s.

    Raises
    ------
    ImageReadError
        For any file that ``read_rgb`` refuses, with the same reason.
    """
    if not isinstance(long_side, int) or long_side < 1:
        raise ValueError(f"long_side must be a positive int, got {long_side!r}")
    return _read(path, max_pixels=max_pixels, min_side=min_side, long_side=long_side)


def _read(
    path: str | os.PathLike, *, max_pixels: int, min_side: int, long_side: int | None
) -> tuple[Image.Image, tuple[int, int], list[str]]:
    """Open, check, decode (reduced for ``long_side``) and make upright: (image, full upright size, notes)."""
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if not isinstance(min_side, int) or min_side < 1:
        raise ValueError(f"min_side must be a positive int, got {min_side!r}")
    name = os.fsdecode(path)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ImageReadError(name, _os_reason(exc)) from None
    with handle:
        image, family = _open_allowed(handle, name, max_pixels=max_pixels, min_side=min_side)
        full_size = image.size  # as stored; swapped below when EXIF turns the image
        if long_side is not None and family == "JPEG":
            _reduce_jpeg_decode(image, long_side)
        notes = _decode(image, name, family)
        orientation = _orientation(image)
        if orientation is None:
            notes.append("EXIF unreadable; orientation not applied")
        elif orientation in _SWAPPING_ORIENTATIONS:
            full_size = full_size[::-1]
        image, notes = _to_upright_rgb(image, name, notes, orientation or 1)
    return image, full_size, notes


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation (1 when absent), or None when the EXIF block cannot be read."""
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # EXIF is optional metadata; a broken block must not fail a good image
        return None


def _reduce_jpeg_decode(image: Image.Image, long_side: int) -> None:
    """Before loading: decode a JPEG at the smallest DCT scale still at least its bounded size.

    A JPEG's EXIF is in its header, so the orientation is known before decoding; the scale is
    chosen in the stored orientation, which EXIF then turns upright.
    """
    swapping = _orientation(image) in _SWAPPING_ORIENTATIONS
    upright = image.size[::-1] if swapping else image.size
    target = bounded_size(upright, long_side)
    if target != upright:
        # PIL picks the largest of 8, 4, 2, 1 that keeps each side at least the target's (sides rounded up).
        image.draft(None, target[::-1] if swapping else target)


def content_hash(path: str | os.PathLike) -> str:
    """`identity.file_digest` of an image file, with read errors as `ImageReadError`.

    Parameters
    ----------
    path : str or path-like
        Any file.

    Returns
    -------
    digest : str
        64 lowercase hex characters.

    Raises
    ------
    ImageReadError
        When the bytes cannot be read (reason as in ``read_rgb``).
    """
    try:
        return file_digest(path)
    except OSError as exc:
        raise ImageReadError(path, _os_reason(exc)) from None


def _os_reason(exc: OSError) -> str:
    reasons = {
        errno.ENOENT: "file not found",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EISDIR: "is a directory",
        errno.ELOOP: "symlink loop",
    }
    return reasons.get(exc.errno, f"cannot read file ({exc.strerror or exc})")


def _open_allowed(handle, name: str, *, max_pixels: int, min_side: int) -> tuple[Image.Image, str]:
    """Identify the format from the bytes and parse the header only; returns (image, family)."""
    try:
        prefix = handle.read(_PREFIX_BYTES)
    except OSError as exc:
        raise ImageReadError(name, _os_reason(exc)) from None
    if not prefix:
        raise ImageReadError(name, "zero-byte file")
    Image.init()
    image = None
    for fmt in ALLOWED_FORMATS:
        factory, accept = Image.OPEN[fmt]
        if accept(prefix) is not True:
            continue
        handle.seek(0)
        try:
            # The plugin's opener parses the header without PIL's bomb check, so the size
            # check below is the one that decides.
            image = factory(handle, name)
        except (OSError, SyntaxError, ValueError, IndexError, TypeError, EOFError) as exc:
            raise ImageReadError(name, f"corrupt {fmt} header ({exc})") from None
        except Exception as exc:  # a plugin bug must not escape as a raw exception
            raise ImageReadError(name, f"corrupt {fmt} header ({type(exc).__name__}: {exc})") from None
        break
    if image is None:
        raise ImageReadError(name, _unrecognised_reason(handle, name, prefix))
    family = _FORMAT_FAMILY.get(image.format or "", "")
    if not family:
        raise ImageReadError(name, f"unsupported format '{image.format}'")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageReadError(
            name,
            f"declared size {width}x{height} exceeds the limit of {max_pixels} pixels (decompression bomb)",
        )
    if min(width, height) < min_side:
        raise ImageReadError(name, f"smaller than min side {min_side}: {width}x{height}")
    return image, family


def _unrecognised_reason(handle, name: str, prefix: bytes) -> str:
    """Name the format of a refused file (GIF, WebP, ...) or say it is text or unknown data."""
    for fmt in Image.ID:
        if fmt in ALLOWED_FORMATS:
            continue
        _, accept = Image.OPEN[fmt]
        # Plugins without a sniffer would claim every file; only a positive sniff names one.
        if accept is not None and accept(prefix) is True:
            return f"unsupported format '{fmt}'"
    handle.seek(0)
    try:
        head = handle.read(_TEXT_SNIFF_BYTES)
    except OSError:
        head = prefix
    suffix = Path(name).suffix or "without a suffix"
    if _looks_like_text(head):
        return f"not an image (text file named {suffix})"
    return f"not an image (unrecognised data in a file named {suffix})"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A cut at the read size can split one multi-byte character; forgive only that.
        if len(head) < _TEXT_SNIFF_BYTES or exc.start < len(head) - 3:
            return False
        text = head[: exc.start].decode("utf-8")
    return all(char.isprintable() or char in "\t\n\r\f\v" for char in text)


def _decode(image: Image.Image, name: str, family: str) -> list[str]:
    """Decode every pixel now, so a truncated file fails here and not in a later stage."""
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            # Our size check already ran; PIL's warning between its two limits is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombError as exc:
        raise ImageReadError(name, f"exceeds PIL's own pixel limit (decompression bomb): {exc}") from None
    except MemoryError:
        raise ImageReadError(name, f"out of memory decoding {family} data") from None
    except (OSError, SyntaxError, EOFError, ValueError) as exc:
        message = str(exc)
        if "truncated" in message or isinstance(exc, EOFError) or "broken data stream" in message:
            raise ImageReadError(name, f"truncated {family} data") from None
        raise ImageReadError(name, f"corrupt {family} data ({message})") from None
    except Exception as exc:  # decoders raise a zoo of types; none may escape raw
        raise ImageReadError(name, f"corrupt {family} data ({type(exc).__name__}: {exc})") from None
    if image.format == "MPO":
        notes.append("multi-picture JPEG: first picture used")
    return notes


def _to_upright_rgb(image: Image.Image, name: str, notes: list[str], orientation: int) -> tuple[Image.Image, list[str]]:
    if orientation in range(2, 9):
        image = ImageOps.exif_transpose(image)
        notes.append(f"EXIF orientation {orientation} applied")
    mode = image.mode
    if mode == "RGB":
        # Loaded, the image holds its pixels and has let go of the file: PIL memory-maps only
        # raw files of other modes (L, P, RGBX, RGBA, CMYK, I;16), which are converted below.
        # A copy here cost a third of a 5-MP capture's decoding (a fresh 15 MB buffer).
        return image, notes
    if mode == "F":
        raise ImageReadError(name, "unsupported pixel mode 'F' (floating-point samples have no fixed range)")
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        samples = np.asarray(image, dtype=np.int64)
        if samples.min(initial=0) < 0 or samples.max(initial=0) > 65535:
            notes.append("samples outside 0..65535 clipped")
            samples = np.clip(samples, 0, 65535)
        # Full-range scaling (65535 -> 255): the true range of a 16-bit sample, not min-max.
        grey = ((samples + 128) // 257).astype(np.uint8)
        rgb = Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB")
    else:
        try:
            rgb = image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise ImageReadError(name, f"unsupported pixel mode '{mode}' ({exc})") from None
    if "A" in mode or mode == "RGBa" or "transparency" in image.info:
        notes.append(f"alpha dropped (converted from {mode} to RGB)")
    else:
        notes.append(f"converted from {mode} to RGB")
    return rgb, notes
