"""What a ``POST /predict`` may carry, checked before any model runs. No Ray here: every rule is a
plain function, unit-tested on its own and reused by the deployment.

Two request shapes:

* an image body — ``Content-Type: image/jpeg | image/png | image/webp`` (or
  ``application/octet-stream``); options in the query string: ``?top_k=3&classes=apple,bear``;
* JSON — ``{"images": [base64, ...], "top_k": 5, "classes": [...], "groups": [...],
  "probabilities": false}``.

Every violation raises :class:`RequestError` with the HTTP status to answer (4xx) and a message
naming the problem; the caller turns it into ``{"error": message}``.
"""
from __future__ import annotations

import base64
import binascii
import difflib
import json
from dataclasses import dataclass, field

import numpy as np

from pipelines.data.records import BadImage, eval_transform, open_image

FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
IMAGE_TYPES = ("image/jpeg", "image/jpg", "image/png", "image/webp", "application/octet-stream")
JSON_TYPES = ("application/json",)


class RequestError(Exception):
    """A request the service refuses: ``status`` (4xx) and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Limits:
    """Per-request limits. Light to change: they live in the deployment's ``user_config``."""

    max_body_bytes: int = 16 * 2**20   # the whole HTTP body
    max_images: int = 32               # images in one request
    max_pixels: int = 40_000_000       # width x height of one image, checked from its header
    max_top_k: int = 100
    # A body over max_body_bytes is read to its end and dropped before the 413 (so a client
    # that sends everything before reading gets the answer, not a reset), if it is at most
    # max_drain_bytes in all and arrives within drain_timeout_s.
    max_drain_bytes: int = 64 * 2**20
    drain_timeout_s: int = 30

    def __post_init__(self):
        for name in ("max_body_bytes", "max_images", "max_pixels", "max_top_k", "max_drain_bytes", "drain_timeout_s"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"limits.{name} must be a positive integer, got {getattr(self, name)!r}")


@dataclass
class PredictRequest:
    images: list[bytes]
    top_k: int = 5
    classes: list | None = None        # class names or indices to restrict the answer to
    groups: list[int] | None = None    # or whole groups
    probabilities: bool = False        # also return the probability of every scored class
    sources: list[str] = field(default_factory=list)  # "images[i]" or "body", for error messages


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def parse_predict(body: bytes, content_type: str | None, query: dict[str, str], limits: Limits) -> PredictRequest:
    """A ``/predict`` body + its content type + query parameters -> :class:`PredictRequest`."""
    kind = media_type(content_type)
    if not body:
        raise RequestError(400, "empty body: send an image (Content-Type: image/jpeg, image/png or image/webp) "
                                "or JSON {\"images\": [base64, ...]}")
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"body of {len(body)} bytes is over the limit of {limits.max_body_bytes} bytes")
    if kind in JSON_TYPES:
        return _parse_json(body, limits)
    if kind in IMAGE_TYPES:
        options = _options({k: v for k, v in query.items()}, from_query=True)
        return PredictRequest(images=[body], sources=["body"], **options)
    shown = kind or "none"
    raise RequestError(415, f"unsupported Content-Type {shown!r}: send image/jpeg, image/png, image/webp "
                            "or application/json (with curl: -H 'Content-Type: image/jpeg' --data-binary @cat.jpg)")


def _parse_json(body: bytes, limits: Limits) -> PredictRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"JSON body must be an object with \"images\", got {type(data).__name__}")
    unknown = sorted(set(data) - {"images", "top_k", "classes", "groups", "probabilities"})
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: images, top_k, classes, "
                                "groups, probabilities")
    images = data.get("images")
    if not isinstance(images, list) or not images:
        raise RequestError(400, "\"images\" must be a non-empty list of base64 strings")
    if len(images) > limits.max_images:
        raise RequestError(413, f"{len(images)} images in one request; the limit is {limits.max_images}")
    decoded = []
    for i, text in enumerate(images):
        if not isinstance(text, str):
            raise RequestError(400, f"images[{i}] must be a base64 string, got {type(text).__name__}")
        if text.startswith("data:") and "," in text:  # accept data URLs as browsers write them
            text = text.split(",", 1)[1]
        try:
            decoded.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(400, f"images[{i}] is not valid base64") from None
    options = _options({k: data[k] for k in ("top_k", "classes", "groups", "probabilities") if k in data})
    return PredictRequest(images=decoded, sources=[f"images[{i}]" for i in range(len(decoded))], **options)


def _options(raw: dict, from_query: bool = False) -> dict:
    out: dict = {}
    if from_query:
        unknown = sorted(set(raw) - {"top_k", "classes", "groups", "probabilities"})
        if unknown:
            raise RequestError(400, f"unknown query parameter(s) {', '.join(map(repr, unknown))}; allowed: top_k, "
                                    "classes, groups, probabilities")
        if "classes" in raw:
            raw["classes"] = [c for c in raw["classes"].split(",") if c]
        if "groups" in raw:
            raw["groups"] = [g for g in raw["groups"].split(",") if g]
        if "probabilities" in raw:
            raw["probabilities"] = raw["probabilities"].lower() in ("1", "true", "yes")
    if "top_k" in raw:
        top_k = raw["top_k"]
        try:
            if isinstance(top_k, bool) or (isinstance(top_k, float) and not top_k.is_integer()):
                raise ValueError
            top_k = int(top_k)
        except (TypeError, ValueError):
            raise RequestError(400, f"top_k must be a positive integer, got {raw['top_k']!r}") from None
        if top_k < 1:
            raise RequestError(400, f"top_k must be a positive integer, got {top_k}")
        out["top_k"] = top_k
    if "classes" in raw:
        if not isinstance(raw["classes"], list) or not raw["classes"]:
            raise RequestError(400, "\"classes\" must be a non-empty list of class names or indices")
        out["classes"] = raw["classes"]
    if "groups" in raw:
        groups = raw["groups"]
        if not isinstance(groups, list) or not groups:
            raise RequestError(400, "\"groups\" must be a non-empty list of group numbers")
        try:
            out["groups"] = [int(g) for g in groups if not isinstance(g, bool)]
        except (TypeError, ValueError):
            raise RequestError(400, f"\"groups\" must be group numbers, got {groups!r}") from None
        if len(out["groups"]) != len(groups):
            raise RequestError(400, f"\"groups\" must be group numbers, got {groups!r}")
    if "probabilities" in raw:
        if not isinstance(raw["probabilities"], bool):
            raise RequestError(400, f"\"probabilities\" must be true or false, got {raw['probabilities']!r}")
        out["probabilities"] = raw["probabilities"]
    return out


def resolve_classes(request: PredictRequest, class_names: list[str], class_to_group: list[int]) -> list[int] | None:
    """The class ids a request asks about (sorted), or None for all. Names or indices; groups add
    all their classes. Unknown names, out-of-range indices or groups -> 400 naming them."""
    if request.classes is None and request.groups is None:
        return None
    index = {name: i for i, name in enumerate(class_names)}
    wanted: set[int] = set()
    unknown = []
    for c in request.classes or []:
        if isinstance(c, bool):
            unknown.append(repr(c))
        elif isinstance(c, int) or (isinstance(c, str) and c.isdigit() and c not in index):
            if 0 <= int(c) < len(class_names):
                wanted.add(int(c))
            else:
                unknown.append(f"{c} (indices are 0..{len(class_names) - 1})")
        elif isinstance(c, str) and c in index:
            wanted.add(index[c])
        else:
            close = difflib.get_close_matches(str(c), class_names, n=1)
            unknown.append(repr(c) + (f" (did you mean {close[0]!r}?)" if close else ""))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise RequestError(400, f"unknown class(es) in the filter: {shown}; GET /metadata lists the classes")
    num_groups = max(class_to_group) + 1
    bad_groups = [g for g in request.groups or [] if not 0 <= g < num_groups]
    if bad_groups:
        raise RequestError(400, f"unknown group(s) {bad_groups}; this tree has groups 0..{num_groups - 1}")
    for g in request.groups or []:
        wanted.update(c for c, cg in enumerate(class_to_group) if cg == g)
    return sorted(wanted)


def decode_images(request: PredictRequest, size: int, limits: Limits) -> np.ndarray:
    """The request's images, checked and transformed as evaluation does: uint8 [N, size, size, 3].

    Non-images, truncated files and empty images answer 400; GIF/BMP/TIFF... 415; an image over
    the pixel limit 413 (checked from its header, before decoding: no decompression bomb)."""
    out = []
    for data, source in zip(request.images, request.sources):
        try:
            im, _ = open_image(data, limits.max_pixels, formats=FORMATS)
        except BadImage as e:
            status = {"too_large": 413, "unsupported_format": 415}.get(e.kind, 400)
            what = {"empty": "is empty", "not_image": "is not an image (JPEG, PNG or WebP expected)",
                    "truncated": "is truncated or corrupt", "too_large": "has too many pixels",
                    "unsupported_format": "is in an unsupported format"}.get(e.kind, e.kind)
            raise RequestError(status, f"{source} {what}: {e.detail}") from None
        out.append(eval_transform(im, size))
    return np.stack(out)
