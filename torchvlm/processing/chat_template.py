"""Chat templates: render a checkpoint's jinja2 chat template the way HF transformers does.

The environment matches transformers' (``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now``, and a ``tojson``
filter that does not HTML-escape and accepts ``indent`` / ``separators`` / ``sort_keys`` / ``ensure_ascii``).
Message values are reduced to plain JSON data before rendering (images and tensors inside content parts
become inert ``"<TypeName>"`` strings), so templates can test for the presence of media but never touch
the objects.

When a checkpoint has no template, :data:`DEFAULT_CHAT_TEMPLATE` is used: one line per message,
``"<role>: <text>"``, image parts rendered as the processor's image placeholder (``<image>`` by default)
followed by a newline, and a trailing ``"assistant:"`` when ``add_generation_prompt`` is set.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from datetime import datetime
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from torchvlm.errors import ProcessorError

__all__ = ["render_chat_template", "DEFAULT_CHAT_TEMPLATE", "normalize_messages", "compile_chat_template"]

#: Template used when a checkpoint ships none (documented in docs/processing.md).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ image_token | default('<image>') }}{{ '\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SafeNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore-prefixed attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} must not start with '_'")


def _dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile (cached) a chat template in the HF-compatible sandboxed environment."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _dict
    env.globals["namespace"] = _SafeNamespace
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """Reduce *value* to plain JSON-like data (what the template may see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # subclasses (str/int enums, numpy float64, ...) become the exact builtin, without calling their __str__
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING = ("reasoning_content", "thinking", "reasoning")


def normalize_messages(messages: Any) -> list[dict]:
    """Validate a chat (list of ``{"role", "content"}`` dicts) and return plain-data copies.

    Raises ProcessorError naming the offending message index.
    """
    if not isinstance(messages, (list, tuple)):
        raise ProcessorError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ProcessorError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise ProcessorError(f"messages[{i}] has no 'role'")
        m = _plain(m)
        reasoning = next((m[k] for k in _REASONING if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_chat_template(
    template: str | None,
    messages: Any,
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **extra: Any,
) -> str:
    """Render *messages* with a jinja2 chat *template* (``None`` -> :data:`DEFAULT_CHAT_TEMPLATE`).

    ``messages`` is a list of ``{"role": ..., "content": str | list[part]}`` where parts are
    ``{"type": "image", ...}`` or ``{"type": "text", "text": ...}``. Extra keyword arguments (``tools``,
    ``documents``, ``pad_token``, ``image_token``, template-specific switches...) are passed to the
    template like HF's ``apply_chat_template(**kwargs)``. Template errors (syntax errors,
    ``raise_exception``, sandbox violations) raise ProcessorError carrying the template's message.
    """
    tmpl_src = DEFAULT_CHAT_TEMPLATE if template is None else template
    if not isinstance(tmpl_src, str):
        raise ProcessorError(f"chat template must be a string, got {type(tmpl_src).__name__}")
    chat = normalize_messages(messages)
    try:
        compiled = compile_chat_template(tmpl_src)
    except jinja2.TemplateSyntaxError as e:
        raise ProcessorError(f"chat template syntax error at line {e.lineno}: {e.message}") from None
    kwargs = {k: _plain(v) for k, v in extra.items()}
    if bos_token is not None:
        kwargs["bos_token"] = bos_token
    if eos_token is not None:
        kwargs["eos_token"] = eos_token
    kwargs.setdefault("tools", None)
    kwargs.setdefault("documents", None)
    try:
        return compiled.render(messages=chat, add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.exceptions.SecurityError as e:
        raise ProcessorError(f"chat template tried an unsafe operation: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ProcessorError(f"chat template error: {e.message or e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise ProcessorError(f"chat template failed: {type(e).__name__}: {e}") from None
