"""An OpenAI-compatible HTTP server for torchvlm models (``torchvlm serve``; needs ``torchvlm[serve]``).

* :mod:`~torchvlm.serve.config` - :class:`ServeConfig`, every limit and allow-list in one place;
* :mod:`~torchvlm.serve.media` - the image loading policy (data URIs, allow-listed URLs, local files);
* :mod:`~torchvlm.serve.schemas` - the request models (pydantic) and OpenAI-style errors;
* :mod:`~torchvlm.serve.worker` - the one thread that drives the continuous-batching engine;
* :mod:`~torchvlm.serve.app` - :func:`create_app`, the FastAPI application factory.

Importing this package needs nothing beyond torchvlm; FastAPI / uvicorn are imported by ``app``.
"""

from __future__ import annotations

from ..errors import TorchVLMError
from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "require_serve_deps"]


def require_serve_deps() -> None:
    """Raise :class:`~torchvlm.errors.TorchVLMError` naming the ``serve`` extra when FastAPI / uvicorn are
    missing."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise TorchVLMError(f"torchvlm serve needs {' and '.join(missing)}: pip install 'torchvlm[serve]'")


def create_app(*args, **kwargs):
    """:func:`torchvlm.serve.app.create_app` (imported on first use)."""
    require_serve_deps()
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
