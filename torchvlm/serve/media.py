"""The server's image loading policy: what an ``image_url`` may point at, and how much it may cost.

:class:`MediaPolicy` turns one ``image_url`` string into an RGB PIL image, or raises :class:`MediaError`
(a 400 for the client, with a message that never carries library exception text):

* ``data:image/...;base64,...`` URIs: always accepted (strict base64, payload size capped before decoding);
* ``http(s)://`` URLs only for hosts on the allow-list (``example.com`` exact, ``*.example.com`` any
  subdomain). The host is resolved once; every address it resolves to must be public (loopback, private,
  link-local / cloud metadata, CGNAT, multicast, reserved, unspecified and IPv6 forms embedding such an IPv4
  address are refused), and the connection goes to the checked address (no second lookup: DNS rebinding
  cannot swap it). Redirects are followed by hand, at most ``max_redirects``, each target checked like the
  first URL. The body is read in chunks under a byte cap and an overall deadline; no credentials in URLs;
  only ``GET``, no cookies, no proxies from the environment.
* ``file://`` URLs only under ``allowed_local_media_path``, after resolving symlinks and ``..``.

Decoding: only PNG, JPEG, WebP, GIF and BMP decoders are enabled; width and height are read from the header
and checked (``max_image_pixels``, ``min_image_side``, ``max_image_aspect_ratio``) before the pixels are
decoded, and Pillow's decompression-bomb guard stays on.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
import time
from collections.abc import Callable
from urllib.parse import unquote, urljoin, urlsplit

from PIL import Image, UnidentifiedImageError

from ..errors import ImageError, TorchVLMError
from ..processing.image import load_image
from .config import ServeConfig

__all__ = ["MediaError", "MediaPolicy", "is_public_address", "normalize_host", "system_resolver"]

log = logging.getLogger("torchvlm.serve.media")

#: Pillow decoders the server lets run (others, e.g. EPS which shells out to Ghostscript, never run).
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

_DATA_URI_RE = re.compile(r"^data:(?P<mime>[A-Za-z0-9.+\-]+/[A-Za-z0-9.+\-]+)?(?P<params>(?:;[^,;]*)*?);base64,",
                          re.I)
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: public addresses that are still a host's private services: Azure's WireServer / metadata relay
_DENIED = (ipaddress.ip_network("168.63.129.16/32"),)
_CHUNK = 64 * 1024
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


class MediaError(TorchVLMError, ValueError):
    """An image the policy refuses or cannot read; ``code`` is the OpenAI-style error code."""

    def __init__(self, message: str, code: str = "invalid_image"):
        super().__init__(message)
        self.code = code


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the system resolver; numeric forms such as ``2130706433`` or
    ``0x7f000001`` resolve as the C library reads them, so they are checked like any other address)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def _dial(ip: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((ip, port), timeout=timeout)


def is_public_address(ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True only for globally routable unicast addresses (see the module docstring for what is refused)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0] if isinstance(ip, str) else ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is None and addr.teredo is not None:
            return False
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(embedded)
    bad = (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_reserved
           or addr.is_unspecified or getattr(addr, "is_site_local", False) or any(addr in n for n in _DENIED))
    return addr.is_global and not bad


def normalize_host(host: str) -> str | None:
    """The one spelling of a URL host that the allow-list, the resolver, the ``Host`` header and TLS SNI all
    use: lower case, without the trailing dot, IDNA (punycode) for non-ASCII names, IP literals in their
    canonical form. ``None`` for anything that is not a plain DNS name or IP literal (empty labels, spaces,
    backslashes, ``%``, ...), so a host cannot look allowed to the string match and mean something else to
    the resolver."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.endswith("."):
        host = host[:-1]
    if not host:
        return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        name = host.encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError):
        return None
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        return None
    return name


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: "_DeadlineSocket"):
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self._sock.recv_into(b)


class _DeadlineSocket:
    """A connected socket whose every send and receive is bounded by the fetch's overall deadline: the
    timeout is set to the time left before each call, so a server trickling one byte at a time (headers or
    body) cannot hold the fetch past ``media_fetch_timeout``. Only what :mod:`http.client` uses."""

    def __init__(self, sock: socket.socket, remaining: Callable[[], float]):
        self._sock, self._remaining = sock, remaining

    def sendall(self, data) -> None:
        self._sock.settimeout(self._remaining())
        self._sock.sendall(data)

    def recv_into(self, buffer) -> int:
        self._sock.settimeout(self._remaining())
        return self._sock.recv_into(buffer)

    def makefile(self, mode: str = "rb", *args, **kwargs):
        if mode != "rb":
            raise ValueError("only binary reads")
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        pass  # http.client closes the connection while its response still reads (HTTP/1.0, Connection: close);
        # like socket.makefile's reference count, the real socket stays open: MediaPolicy._get closes it


def allow_list_entry(entry: str) -> str:
    """One ``--allowed-media-domains`` entry in its normalized form (``*.`` kept); raises
    :class:`~torchvlm.errors.TorchVLMError` for anything that is not a host name or IP address."""
    entry = entry.strip()
    wildcard = entry.startswith("*.")
    host = normalize_host(entry[2:] if wildcard else entry)
    if host is None or (wildcard and ":" in host):
        raise TorchVLMError(f"allowed media domain {entry[:100]!r} is not a host name (example.com, "
                            "*.example.com) or an IP address")
    return "*." + host if wildcard else host


class MediaPolicy:
    """Loads ``image_url`` values under a :class:`~torchvlm.serve.config.ServeConfig`'s limits (thread-safe:
    it holds no per-request state)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.resolver: Callable[[str, int], list[str]] = config.resolver or system_resolver
        self.dial: Callable[[str, int, float], socket.socket] = config.dial or _dial
        self.domains = tuple(allow_list_entry(d) for d in config.allowed_media_domains if d.strip())
        self.tls = config.tls_context or ssl.create_default_context()
        root = config.allowed_local_media_path
        self.local_root = os.path.realpath(root) if root else None

    # ------------------------------------------------------------------------------------------ entry
    def load(self, url: str) -> Image.Image:
        """One ``image_url`` -> RGB PIL image; raises :class:`MediaError`."""
        if not isinstance(url, str) or not url.strip():
            raise MediaError("image_url.url must be a non-empty string")
        url = url.strip()
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = self._data_uri(url)
        elif scheme in ("http", "https"):
            data = self._fetch(url)
        elif scheme == "file":
            data = self._local_file(url)
        else:
            raise MediaError("image_url.url must be a data:image/...;base64 URI"
                             + (", an http(s) URL of an allowed domain" if self.domains else "")
                             + (", or a file:// URL under the allowed media path" if self.local_root else ""),
                             code="invalid_image_url")
        return self.decode(data)

    # ------------------------------------------------------------------------------------------ decoding
    def decode(self, data: bytes) -> Image.Image:
        """Encoded bytes -> RGB image, checking the header's size before any pixel is decoded."""
        cfg = self.config
        if not data:
            raise MediaError("the image is empty")
        if len(data) > cfg.max_image_bytes:
            raise MediaError(f"the image is larger than {cfg.max_image_bytes} bytes", code="image_too_large")
        try:
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError:
            raise MediaError(f"the image has more than {cfg.max_image_pixels} pixels", code="image_too_large") from None
        except UnidentifiedImageError:
            raise MediaError("the data is not an image in a supported format (" + ", ".join(ALLOWED_FORMATS) + ")")
        except Exception:  # noqa: BLE001 - any decoder failure is the client's bad image
            log.info("image header rejected", exc_info=True)
            raise MediaError("the image header cannot be read") from None
        w, h = img.size
        if w * h > cfg.max_image_pixels:
            raise MediaError(f"the image is {w}x{h}: more than {cfg.max_image_pixels} pixels", code="image_too_large")
        if min(w, h) < cfg.min_image_side:
            raise MediaError(f"the image is {w}x{h}: both sides must be at least {cfg.min_image_side} pixels",
                             code="image_too_small")
        if max(w, h) > cfg.max_image_aspect_ratio * min(w, h):
            raise MediaError(f"the image is {w}x{h}: aspect ratio above {cfg.max_image_aspect_ratio:g}")
        try:
            img.load()
            return load_image(img)  # EXIF orientation + RGB, as for every other torchvlm input
        except (ImageError, Image.DecompressionBombError):
            raise MediaError("the image cannot be decoded") from None
        except Exception:  # noqa: BLE001 - truncated / corrupt data
            log.info("image decode failed", exc_info=True)
            raise MediaError("the image cannot be decoded (corrupt or truncated)") from None

    # ------------------------------------------------------------------------------------------ sources
    def _data_uri(self, url: str) -> bytes:
        m = _DATA_URI_RE.match(url)
        if m is None:
            raise MediaError("a data URI must have the form data:image/<type>;base64,<payload>", code="invalid_image_url")
        mime = (m.group("mime") or "").lower()
        if mime and not (mime.startswith("image/") or mime == "application/octet-stream"):
            raise MediaError(f"data URI media type '{mime[:40]}' is not an image", code="invalid_image_url")
        payload = url[m.end():]
        if len(payload) > (self.config.max_image_bytes + 2) * 4 // 3 + 4:
            raise MediaError(f"the image is larger than {self.config.max_image_bytes} bytes", code="image_too_large")
        payload = unquote(payload) if "%" in payload else payload
        if len(payload) % 4 or not _B64_CHARS.match(payload):
            raise MediaError("the data URI payload is not valid base64")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError("the data URI payload is not valid base64") from None

    def _local_file(self, url: str) -> bytes:
        if self.local_root is None:
            raise MediaError("file:// images are disabled (the server has no --allowed-local-media-path)",
                             code="local_media_not_allowed")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise MediaError("a file URL must have the form file:///path", code="invalid_image_url")
        path = unquote(parts.path)
        if "\x00" in path or not path.startswith("/"):
            raise MediaError("a file URL must have the form file:///path", code="invalid_image_url")
        real = os.path.realpath(path)
        if os.path.commonpath([real, self.local_root]) != self.local_root:
            log.warning("file URL outside the allowed media path refused: %r", path[:200])
            raise MediaError("the file is outside the allowed media path", code="local_media_not_allowed")
        if not os.path.isfile(real):
            raise MediaError("the file does not exist under the allowed media path")
        try:  # no symlink at the last step and nothing but a regular file, even if swapped since the check
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            raise MediaError("the file cannot be read") from None
        try:
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise MediaError("the file cannot be read")
                data = f.read(self.config.max_image_bytes + 1)
        except OSError:
            raise MediaError("the file cannot be read") from None
        return data

    def host_allowed(self, host: str) -> bool:
        """Whether ``host`` is on the allow-list (both compared in their :func:`normalize_host` form)."""
        host = normalize_host(host)
        if host is None:
            return False
        for d in self.domains:
            if d.startswith("*."):
                if host.endswith(d[1:]) and len(host) > len(d) - 1:
                    return True
            elif host == d:
                return True
        return False

    def _resolve_checked(self, host: str, port: int) -> str:
        try:
            addresses = list(self.resolver(host, port))
        except (OSError, UnicodeError, ValueError):
            raise MediaError(f"the image URL host '{host}' cannot be resolved", code="media_fetch_failed") from None
        if not addresses:
            raise MediaError(f"the image URL host '{host}' cannot be resolved", code="media_fetch_failed")
        for a in addresses:
            if not is_public_address(a):
                log.warning("image URL host %r resolves to non-public address %s: refused", host, a)
                raise MediaError(f"the image URL host '{host}' resolves to a non-public address",
                                 code="media_address_forbidden")
        return addresses[0].split("%", 1)[0]

    def _fetch(self, url: str) -> bytes:
        cfg = self.config
        if not self.domains:
            raise MediaError("remote image URLs are disabled (the server has no --allowed-media-domains); "
                             "send the image as a data URI", code="media_domain_not_allowed")
        deadline = time.monotonic() + cfg.media_fetch_timeout
        for _hop in range(cfg.max_redirects + 1):
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https"):
                raise MediaError("an image URL redirected to a non-http(s) URL", code="invalid_image_url")
            if parts.username is not None or parts.password is not None:
                raise MediaError("image URLs must not carry credentials", code="invalid_image_url")
            try:
                port = parts.port or (443 if scheme == "https" else 80)
            except ValueError:
                raise MediaError("the image URL has an invalid port", code="invalid_image_url") from None
            if not parts.hostname:
                raise MediaError("the image URL has no host", code="invalid_image_url")
            host = normalize_host(parts.hostname)
            if host is None:
                raise MediaError("the image URL host is not a valid host name", code="invalid_image_url")
            if not self.host_allowed(host):
                raise MediaError(f"the image URL host '{host[:100]}' is not in the allowed media domains",
                                 code="media_domain_not_allowed")
            ip = self._resolve_checked(host, port)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            status, location, body = self._get(scheme, host, port, ip, target, deadline)
            if status in _REDIRECTS:
                if not location:
                    raise MediaError("the image URL redirected without a location", code="media_fetch_failed")
                url = urljoin(url, location)
                continue
            if status != 200:
                raise MediaError(f"the image URL answered HTTP {status}", code="media_fetch_failed")
            return body
        raise MediaError(f"the image URL redirected more than {cfg.max_redirects} times", code="media_fetch_failed")

    def _get(self, scheme: str, host: str, port: int, ip: str, target: str, deadline: float
             ) -> tuple[int, str | None, bytes]:
        cap = self.config.max_image_bytes

        def remaining() -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MediaError("fetching the image URL timed out", code="media_fetch_failed")
            return left

        conn = raw = None
        try:
            raw = self.dial(ip, port, remaining())
            if scheme == "https":  # the certificate is verified for the name, on the checked address
                raw.settimeout(remaining())
                raw = self.tls.wrap_socket(raw, server_hostname=host)
            conn = http.client.HTTPConnection(host, port, timeout=remaining())
            conn.sock = _DeadlineSocket(raw, remaining)  # connected to the checked address; Host carries the name
            conn.request("GET", target, headers={"User-Agent": "torchvlm-serve", "Accept": "image/*",
                                                 "Accept-Encoding": "identity"})
            resp = conn.getresponse()
            if resp.status in _REDIRECTS:
                return resp.status, resp.getheader("Location"), b""
            if resp.status != 200:
                return resp.status, None, b""
            length = resp.getheader("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > cap:
                raise MediaError(f"the image is larger than {cap} bytes", code="image_too_large")
            chunks, total = [], 0
            while True:
                chunk = resp.read(_CHUNK)  # every receive under it is bounded by the overall deadline
                if not chunk:
                    break
                total += len(chunk)
                if total > cap:
                    raise MediaError(f"the image is larger than {cap} bytes", code="image_too_large")
                chunks.append(chunk)
            return 200, None, b"".join(chunks)
        except MediaError:
            raise
        except TimeoutError:  # socket.timeout: the last receive ran into the deadline
            raise MediaError("fetching the image URL timed out", code="media_fetch_failed") from None
        except (OSError, http.client.HTTPException, ValueError):
            log.info("image fetch from %s (%s) failed", host, ip, exc_info=True)
            raise MediaError("fetching the image URL failed", code="media_fetch_failed") from None
        finally:
            if conn is not None:
                conn.close()
            if raw is not None:
                raw.close()
