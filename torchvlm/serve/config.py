"""Server settings: every limit and allow-list of ``torchvlm serve`` in one dataclass (safe defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["ServeConfig"]


@dataclass
class ServeConfig:
    """Settings of one server (see docs/security.md for why each limit exists).

    Args:
        served_model_name: the ``model`` name clients must send (and ``/v1/models`` lists).
        api_key: required as ``Authorization: Bearer <key>`` on every route but ``/health`` and the page
            itself; ``None`` = no authentication (only sensible on loopback).
        allowed_media_domains: host names remote image URLs may use (``example.com`` matches exactly,
            ``*.example.com`` any subdomain). Empty = no remote URLs (data URIs only).
        allowed_local_media_path: directory ``file://`` images may come from (after resolving symlinks).
            ``None`` = no local files.
        max_batch_size: requests decoded together (rows of the engine's KV cache).
        max_queue: requests waiting for a row; beyond it new requests get 429.
        max_images_per_request: images in one request.
        max_image_pixels: width * height of one image, checked from the header before decoding.
        min_image_side: smallest accepted width / height (degenerate images break some processors).
        max_image_aspect_ratio: longest / shortest side.
        max_image_bytes: encoded size of one image (data URI payload, download or file).
        max_body_bytes: size of a request body.
        media_fetch_timeout: seconds for one remote image (connect + every read; also an overall deadline).
        max_redirects: redirects followed per remote image (each one re-checked).
        max_model_len: engine cache length per request (prompt + completion); ``None``: the model's context
            length capped at 4096.
        default_max_tokens: completion length when a request gives none (``None``: the rest of the context).
        max_n: largest ``n`` (choices per request).
        compile: decode through the engine's ``torch.compile``-captured step (``Engine(compile=True)``):
            faster steps after compiling on the first requests (a minute or two on 2 CPU cores).
        resolver: ``(host, port) -> [ip, ...]``; default: the system resolver. Tests inject a fake DNS.
        dial: ``(ip, port, timeout) -> socket``; default: ``socket.create_connection``. Tests route a fake
            public address to a local test server; the address checks still run on the resolved ip.
        tls_context: the :class:`ssl.SSLContext` https image downloads verify certificates with; default:
            ``ssl.create_default_context()`` (system CAs, host name checked). Tests inject one trusting a
            test CA.
    """

    served_model_name: str = "model"
    api_key: str | None = None
    allowed_media_domains: tuple[str, ...] = ()
    allowed_local_media_path: str | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    max_images_per_request: int = 8
    max_image_pixels: int = 4096 * 4096
    min_image_side: int = 4
    max_image_aspect_ratio: float = 200.0
    max_image_bytes: int = 16 * 1024 * 1024
    max_body_bytes: int = 32 * 1024 * 1024
    media_fetch_timeout: float = 10.0
    max_redirects: int = 3
    max_model_len: int | None = None
    default_max_tokens: int | None = None
    max_n: int = 8
    compile: bool = False
    resolver: Callable | None = field(default=None, repr=False)
    dial: Callable | None = field(default=None, repr=False)
    tls_context: Any = field(default=None, repr=False)
