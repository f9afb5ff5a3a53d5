"""``torchvlm serve``: the command-line entry of the OpenAI-compatible server.

Only the parser lives here at import time (``torchvlm --help`` stays fast and works without FastAPI);
the server itself is imported when the command runs.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from ..demo import DEMO_MODEL
from ..errors import TorchVLMError
from .config import ServeConfig

_DEFAULTS = ServeConfig()


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """Register ``torchvlm serve`` on the CLI's subparsers object."""
    from ..cli import _model_args

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page (needs torchvlm[serve])",
                       description="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, "
                                   "/v1/models, /health, /metrics) and a web chat page at /. See docs/serving.md "
                                   "and docs/security.md.")
    _model_args(s)  # no --model: the embedded demo model
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None,
                   help=f"model name clients send (default: --model, or '{DEMO_MODEL}' for the demo model)")
    s.add_argument("--api-key", default=None,
                   help="required as 'Authorization: Bearer KEY' (default: $TORCHVLM_API_KEY; none = no auth, "
                        "refused on non-loopback hosts)")
    s.add_argument("--allowed-media-domains", nargs="*", default=[], metavar="HOST",
                   help="hosts remote image URLs may use (example.com, *.example.com); default: none")
    s.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="directory file:// images may come from; default: no local files")
    s.add_argument("--max-batch-size", type=int, default=_DEFAULTS.max_batch_size)
    s.add_argument("--max-queue", type=int, default=_DEFAULTS.max_queue, help="waiting requests before 429")
    s.add_argument("--max-images-per-request", type=int, default=_DEFAULTS.max_images_per_request)
    s.add_argument("--max-image-pixels", type=int, default=_DEFAULTS.max_image_pixels)
    s.add_argument("--max-image-bytes", type=int, default=_DEFAULTS.max_image_bytes)
    s.add_argument("--max-body-bytes", type=int, default=_DEFAULTS.max_body_bytes)
    s.add_argument("--media-fetch-timeout", type=float, default=_DEFAULTS.media_fetch_timeout)
    s.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion tokens per request (default: the model's, capped at 4096)")
    s.add_argument("--default-max-tokens", type=int, default=None,
                   help="completion length when a request sets none (default: the rest of the context)")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    from ..distributed.cli import add_pipeline_args

    add_pipeline_args(s)  # rank 0 serves HTTP, the other torchrun ranks run their stage (docs/distributed.md)
    s.set_defaults(func=cmd_serve)
    return s


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_from_args(ns: argparse.Namespace) -> ServeConfig:
    """The :class:`ServeConfig` of parsed ``torchvlm serve`` arguments (checks them)."""
    api_key = ns.api_key if ns.api_key is not None else os.environ.get("TORCHVLM_API_KEY") or None
    if api_key is None and not _is_loopback(ns.host):
        raise TorchVLMError(f"--host {ns.host} is not loopback: set --api-key (or TORCHVLM_API_KEY)")
    for name in ("max_batch_size", "max_images_per_request", "max_image_pixels", "max_image_bytes",
                 "max_body_bytes"):
        if getattr(ns, name) < 1:
            raise TorchVLMError(f"--{name.replace('_', '-')} must be >= 1")
    if ns.max_queue < 0:
        raise TorchVLMError("--max-queue must be >= 0")
    from .media import allow_list_entry

    for entry in ns.allowed_media_domains or ():
        allow_list_entry(entry)  # a bad entry stops the command before the model is loaded
    local = ns.allowed_local_media_path
    if local is not None and not os.path.isdir(local):
        raise TorchVLMError(f"--allowed-local-media-path {local}: not a directory")
    return ServeConfig(
        served_model_name=ns.served_model_name or (str(ns.model) if ns.model is not None else DEMO_MODEL),
        api_key=api_key,
        allowed_media_domains=tuple(ns.allowed_media_domains or ()), allowed_local_media_path=local,
        max_batch_size=ns.max_batch_size, max_queue=ns.max_queue, max_images_per_request=ns.max_images_per_request,
        max_image_pixels=ns.max_image_pixels, max_image_bytes=ns.max_image_bytes, max_body_bytes=ns.max_body_bytes,
        media_fetch_timeout=ns.media_fetch_timeout, max_model_len=ns.max_model_len,
        default_max_tokens=ns.default_max_tokens, compile=ns.compile,
    )


def cmd_serve(ns: argparse.Namespace) -> int:
    """``torchvlm serve``: load the model, then serve it until interrupted."""
    from . import require_serve_deps

    require_serve_deps()
    config = config_from_args(ns)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..cli import _load
    from .app import create_app, run

    model, processor = _load(ns)
    engine = None
    if getattr(ns, "pipeline_stages", None):  # one request at a time through the stages
        from ..distributed.pipeline import pipeline_engine

        engine = pipeline_engine(model, processor, config)
    app = create_app(model, processor, config, engine=engine)
    if config.api_key is None:
        print("warning: no --api-key: every client on this host can use the server", file=sys.stderr)
    run(app, host=ns.host, port=ns.port, log_level=ns.log_level)
    return 0
