"""Query parameters of rendered requests, parsed into `render.Options` (pure; house style 1).

WADO-RS rendered and thumbnail resources (PS3.18 8.3.5.1): `window=center,width[,function]`,
`viewport=vw,vh[,sx,sy[,sw,sh]]`, `quality=1..100`, `annotation` (not supported: ignored with a Warning), and the
media type from the `accept` query parameter or the Accept header (PS3.18 8.3.3.1, 8.7.4).
WADO-URI (PS3.18 9): `contentType`, `windowCenter` with `windowWidth`, `rows`, `columns`, `region`,
`frameNumber`, `imageQuality`, `annotation`.

Malformed values are `InvalidParameter` (400) with the parameter's name; media types nothing can be rendered as
are `NotAcceptable` (406).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dicomweb.codecs import mediatypes
from dicomweb.errors import BadRequest, InvalidParameter, NotAcceptable
from dicomweb.pixels.render import (
    DEFAULT_QUALITY,
    JPEG,
    LINEAR,
    LINEAR_EXACT,
    RENDERED_TYPES,
    SIGMOID,
    THUMBNAIL_SIZE,
    Crop,
    Options,
    Window,
)

MAX_VIEWPORT = 4096
"""The largest rendered width or height we produce (larger requests are 400)."""
_FUNCTIONS = {"linear": LINEAR, "linear-exact": LINEAR_EXACT, "sigmoid": SIGMOID}


@dataclass(frozen=True, slots=True)
class Parsed:
    """Options for the renderer and the warnings to send (`Warning: 299`) for what was ignored."""

    options: Options
    warnings: list[str] = field(default_factory=list)


def choose_media_type(ranges: list[mediatypes.MediaType]) -> str:
    """The first rendered media type the client accepts, most preferred range first; image/jpeg for `*/*` or
    `image/*` (the default of PS3.18 Table 8.7.4-1). `multipart/related; type=image/png` asks for PNG parts."""
    for accepted in ranges:
        if accepted.essence == mediatypes.MULTIPART_RELATED:
            inner = accepted.param("type")
            if inner is None:
                return JPEG
            accepted = mediatypes.parse_media_type(inner)
        for media_type in RENDERED_TYPES:
            if accepted.matches(media_type):
                return media_type
    asked = ", ".join(str(r) for r in ranges)[:200]
    raise NotAcceptable(f"rendered resources are {', '.join(RENDERED_TYPES)}; not {asked}", RENDERED_TYPES)


def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidParameter(name, f"not a number: {text[:40]!r}") from None
    if not math.isfinite(value):
        raise InvalidParameter(name, f"not a finite number: {text[:40]!r}")
    return value


def _integer(name: str, text: str, low: int | None = None, high: int | None = None) -> int:
    stripped = text.strip()
    if not stripped.lstrip("+-").isdigit() or not stripped.isascii() or len(stripped) > 12:
        raise InvalidParameter(name, f"not an integer: {text[:40]!r}")
    value = int(stripped)
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidParameter(name, f"{value} is outside {low}..{high}")
    return value


def parse_window(text: str) -> Window:
    """`window=center,width,function` (PS3.18 8.3.5.1.4); the function defaults to linear."""
    items = [item.strip() for item in text.split(",")]
    if len(items) not in (2, 3) or not items[0] or not items[1]:
        raise InvalidParameter("window", f"expected center,width[,function]: {text[:80]!r}")
    center, width = _number("window", items[0]), _number("window", items[1])
    function = _FUNCTIONS.get(items[2].lower() if len(items) == 3 else "linear")
    if function is None:
        raise InvalidParameter("window", f"the function is linear, linear-exact or sigmoid: {items[2][:40]!r}")
    if width <= 0 or (function == LINEAR and width < 1):
        raise InvalidParameter("window", f"the width must be positive (at least 1 for linear): {items[1][:40]!r}")
    return Window(center, width, function)


def parse_viewport(text: str) -> tuple[tuple[int | None, int | None], Crop | None]:
    """`viewport=vw,vh[,sx,sy[,sw,sh]]` (PS3.18 8.3.5.1.3): the size to fit and the source region (empty values
    take their defaults; a negative sw or sh flips)."""
    items = [item.strip() for item in text.split(",")]
    if len(items) not in (2, 4, 6):
        raise InvalidParameter("viewport", f"expected vw,vh[,sx,sy[,sw,sh]]: {text[:80]!r}")
    vw = _integer("viewport", items[0], 1, MAX_VIEWPORT) if items[0] else None
    vh = _integer("viewport", items[1], 1, MAX_VIEWPORT) if items[1] else None
    if vw is None and vh is None:
        raise InvalidParameter("viewport", "give the viewport width, height or both")
    crop = None
    if len(items) > 2:
        sx = _integer("viewport", items[2], 0) if items[2] else 0
        sy = _integer("viewport", items[3], 0) if items[3] else 0
        sw = _integer("viewport", items[4]) if len(items) == 6 and items[4] else None
        sh = _integer("viewport", items[5]) if len(items) == 6 and items[5] else None
        if sw == 0 or sh == 0:
            raise InvalidParameter("viewport", "the source region is empty")
        crop = Crop(sx, sy, sw, sh)
    return (vw, vh), crop


def rendered_options(
    media_type: str,
    *,
    window: str | None = None,
    viewport: str | None = None,
    quality: str | None = None,
    annotation: str | None = None,
    thumbnail: bool = False,
) -> Parsed:
    """Options of a WADO-RS rendered (or, with `thumbnail`, thumbnail) request."""
    warnings: list[str] = []
    size: tuple[int | None, int | None] | None = (THUMBNAIL_SIZE, THUMBNAIL_SIZE) if thumbnail else None
    crop = None
    if viewport is not None:
        size, crop = parse_viewport(viewport)
    q = _integer("quality", quality, 1, 100) if quality is not None else None
    if annotation:
        warnings.append("annotation is not supported: the image is rendered without annotations")
    options = Options(
        media_type=media_type,
        window=parse_window(window) if window is not None else None,
        crop=crop,
        size=size,
        shrink_only=thumbnail and viewport is None,
        quality=q if q is not None else DEFAULT_QUALITY,
    )
    return Parsed(options, warnings)


# ---------------------------------------------------------------------------------------------- WADO-URI


def uri_media_type(content_type: str | None) -> str:
    """The rendered type named by WADO-URI `contentType` (PS3.18 9): image/jpeg when absent."""
    if content_type is None or not content_type.strip():
        return JPEG
    try:
        ranges = mediatypes.parse_accept([content_type])
    except BadRequest:
        raise InvalidParameter("contentType", f"not a list of media types: {content_type[:80]!r}") from None
    return choose_media_type(ranges)


def parse_region(text: str) -> tuple[float, float, float, float]:
    """`region=x1,y1,x2,y2`: the top-left and bottom-right corners as fractions 0.0..1.0 (PS3.18 9)."""
    items = text.split(",")
    if len(items) != 4:
        raise InvalidParameter("region", f"expected four numbers x1,y1,x2,y2: {text[:80]!r}")
    x1, y1, x2, y2 = (_number("region", item.strip()) for item in items)
    if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
        raise InvalidParameter("region", f"corners are fractions with x1 < x2 and y1 < y2: {text[:80]!r}")
    return x1, y1, x2, y2


@dataclass(frozen=True, slots=True)
class UriRendering:
    parsed: Parsed
    frame: int
    """1-based frame number (the first when `frameNumber` is absent)."""


def uri_options(
    media_type: str,
    *,
    window_center: str | None = None,
    window_width: str | None = None,
    rows: str | None = None,
    columns: str | None = None,
    region: str | None = None,
    frame_number: str | None = None,
    image_quality: str | None = None,
    annotation: str | None = None,
) -> UriRendering:
    """Options of a rendered WADO-URI request (PS3.18 9). windowCenter and windowWidth go together."""
    if (window_center is None) != (window_width is None):
        raise InvalidParameter("windowCenter", "windowCenter and windowWidth are given together (PS3.18 9)")
    window = None
    if window_center is not None and window_width is not None:
        window = parse_window(f"{window_center},{window_width}")
    width = _integer("columns", columns, 1, MAX_VIEWPORT) if columns is not None else None
    height = _integer("rows", rows, 1, MAX_VIEWPORT) if rows is not None else None
    frame = _integer("frameNumber", frame_number, 1) if frame_number is not None else 1
    quality = _integer("imageQuality", image_quality, 1, 100) if image_quality is not None else None
    warnings = ["annotation is not supported: the image is rendered without annotations"] if annotation else []
    options = Options(
        media_type=media_type,
        window=window,
        region=parse_region(region) if region is not None else None,
        size=(width, height) if width or height else None,
        quality=quality if quality is not None else DEFAULT_QUALITY,
    )
    return UriRendering(Parsed(options, warnings), frame)
