"""Bad input cannot hurt the server: every malformed request gets the right 4xx with an OpenAI-style error
body (no traceback, no library exception text), and the server is healthy and answers normally afterwards.

SSRF cases run against the real checks: a local HTTP server plays the allowed image host, and the media
module's injectable resolver / dialer map fake names to addresses (``images.test`` -> a public address whose
connection is routed to the local server; ``internal.test`` -> 10.0.0.5, ...). IP literals and numeric host
forms (decimal, hex, octal) go through the system resolver. The dialer records every address it was asked
to connect to, and the suite checks that no non-public address ever got that far.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import socket
import struct
import threading
import zlib

import pytest
from fastapi.testclient import TestClient

from serve_util import API_KEY, MODEL, chat_body, data_uri, png_bytes
from torchvlm.serve.media import is_public_address, system_resolver

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PUBLIC_IP = "93.184.216.34"  # what the fake DNS gives the allowed host; the dialer routes it to the test server
FAKE_DNS = {
    "images.test": [PUBLIC_IP],
    "other.test": [PUBLIC_IP],
    "internal.test": ["10.0.0.5"],
    "meta.test": ["169.254.169.254"],
    "rebind.test": [PUBLIC_IP, "127.0.0.1"],
    "cgnat.test": ["100.64.0.7"],
    "mapped.test": ["::ffff:10.1.2.3"],
    "nat64.test": ["64:ff9b::7f00:1"],
    "sixtofour.test": ["2002:a00:1::1"],
    "teredo.test": ["2001:0:4136:e378:8000:63bf:3fff:fdd2"],
}
ALLOWED = ("images.test", "internal.test", "meta.test", "rebind.test", "cgnat.test", "mapped.test", "nat64.test",
           "sixtofour.test", "teredo.test",
           "127.0.0.1", "localhost", "[::1]", "169.254.169.254", "10.0.0.1", "172.16.0.1", "192.168.1.1",
           "2130706433", "0x7f000001", "0177.0.0.1", "::ffff:127.0.0.1", "0.0.0.0", "224.0.0.1")
FORBIDDEN_TEXT = ("Traceback", 'File "', "PIL", "pydantic", "Errno", "object at 0x", "http.client", "socket",
                  "urllib", "site-packages")


def png_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims ``w`` x ``h`` (no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------------ fixtures
class _Handler(http.server.BaseHTTPRequestHandler):
    image = png_bytes(24, 24, seed=3)

    def log_message(self, *args):
        pass

    def _send(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if not any(k == "Content-Length" for k, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        port = self.server.server_address[1]
        routes = {
            "/img.png": lambda: self._send(200, self.image, [("Content-Type", "image/png")]),
            "/to-loopback": lambda: self._send(302, headers=[("Location", f"http://127.0.0.1:{port}/img.png")]),
            "/to-internal": lambda: self._send(302, headers=[("Location", "http://internal.test/img.png")]),
            "/to-metadata": lambda: self._send(301, headers=[("Location", "http://169.254.169.254/latest/meta-data/")]),
            "/to-file": lambda: self._send(302, headers=[("Location", "file:///etc/passwd")]),
            "/to-other": lambda: self._send(302, headers=[("Location", "http://other.test/img.png")]),
            "/to-img": lambda: self._send(307, headers=[("Location", "/img.png")]),
            "/loop": lambda: self._send(302, headers=[("Location", "/loop")]),
            "/text": lambda: self._send(200, b"hello, not an image", [("Content-Type", "text/plain")]),
            "/declared-big": lambda: self._send(200, b"x", [("Content-Length", str(50 * 1024 * 1024))]),
        }
        if self.path == "/streamed-big":  # no Content-Length: the cap must hold while reading
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
            return
        routes.get(self.path, lambda: self._send(404, b"not found"))()


@pytest.fixture(scope="module")
def image_host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def dialed():
    return []


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media_root")
    media = root / "media"
    media.mkdir()
    (media / "good.png").write_bytes(png_bytes(20, 20))
    (root / "secret.png").write_bytes(png_bytes(20, 20, seed=9))
    os.symlink(root / "secret.png", media / "link.png")
    return media


LIMITS = dict(max_body_bytes=2 * 1024 * 1024, max_image_bytes=1024 * 1024, max_image_pixels=1_000_000,
              max_images_per_request=2, max_model_len=256, max_n=4)


@pytest.fixture(scope="module")
def clients(make_app, image_host, dialed, media_dir):
    """``strict``: the defaults (data URIs only); ``open``: allow-listed hosts and a local media dir."""
    port = image_host.server_address[1]

    def resolver(host, p):
        return FAKE_DNS[host] if host in FAKE_DNS else system_resolver(host, p)

    def dial(ip, p, timeout):
        dialed.append(ip)
        if ip != PUBLIC_IP:
            raise OSError("the test dialer only knows the fake public address")
        return socket.create_connection(("127.0.0.1", port), timeout=timeout)

    strict = make_app(**LIMITS)
    open_ = make_app(**LIMITS, allowed_media_domains=ALLOWED, allowed_local_media_path=str(media_dir),
                     resolver=resolver, dial=dial)
    with TestClient(strict, raise_server_exceptions=False) as s, TestClient(open_, raise_server_exceptions=False) as o:
        yield {"strict": s, "open": o, "port": port, "media": media_dir}


# ------------------------------------------------------------------------------------------ the cases
def _chat(**kw):
    return ("json", chat_body(**kw), "strict")


def _with(field, value, **kw):
    body = chat_body(**kw)
    body[field] = value
    return ("json", body, "strict")


def _msgs(messages):
    return ("json", {"model": MODEL, "messages": messages, "max_tokens": 4}, "strict")


def _img(url, client="strict"):
    return ("json", chat_body(images=[url]), client)


def _raw(data: bytes):
    return ("raw", data, "strict")


TRUNCATED_PNG = png_bytes(64, 64)[:200]
GOOD = data_uri(png_bytes())

# (id, (kind, payload, client name), expected status, expected error code); "{port}" / "{media}" in a JSON
# payload are filled in at run time.
CASES = [
    # --- body / JSON
    ("bad-json", _raw(b'{"model": "x", "messages": ['), 400, "invalid_json"),
    ("empty-body", _raw(b""), 400, "invalid_json"),
    ("json-array", _raw(b"[1, 2, 3]"), 400, "invalid_json"),
    ("json-string", _raw(b'"hello"'), 400, "invalid_json"),
    ("json-nan-temperature", _raw(b'{"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], '
                                  b'"temperature": NaN}'), 400, "invalid_json"),
    ("json-infinity", _raw(b'{"model": "tiny-llava", "messages": [], "top_p": Infinity}'), 400, "invalid_json"),
    ("json-deep-nesting", _raw(b"[" * 200_000 + b"]" * 200_000), 400, "invalid_json"),
    ("not-utf8", _raw(b"\xff\xfe\x00garbage"), 400, "invalid_json"),
    ("body-too-large", _raw(b"{" + b" " * (2 * 1024 * 1024 + 10) + b"}"), 413, "request_too_large"),
    # --- fields and types
    ("missing-model", ("json", {"messages": [{"role": "user", "content": "hi"}]}, "strict"), 400, "invalid_value"),
    ("missing-messages", ("json", {"model": MODEL}, "strict"), 400, "invalid_value"),
    ("empty-messages", _msgs([]), 400, "invalid_value"),
    ("messages-not-list", _msgs("hello"), 400, "invalid_value"),
    ("message-not-object", _msgs(["hello"]), 400, "invalid_value"),
    ("message-missing-role", _msgs([{"content": "hi"}]), 400, "invalid_value"),
    ("unknown-role", _msgs([{"role": "wizard", "content": "hi"}]), 400, "invalid_value"),
    ("content-wrong-type", _msgs([{"role": "user", "content": 42}]), 400, "invalid_value"),
    ("user-content-null", _msgs([{"role": "user", "content": None}]), 400, "invalid_value"),
    ("unknown-part-type", _msgs([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]), 400, "invalid_value"),
    ("text-part-not-string", _msgs([{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]), 400, "invalid_value"),
    ("image-url-missing", _msgs([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400, "invalid_value"),
    ("image-url-not-string", _msgs([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 7}}]}]),
     400, "invalid_value"),
    ("image-in-assistant-message", _msgs([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": GOOD}}]}, {"role": "user", "content": "and?"}]), 400, "invalid_value"),
    ("model-not-string", _with("model", 12), 400, "invalid_value"),
    ("unknown-model", _with("model", "gpt-9"), 404, "model_not_found"),
    ("max-tokens-zero", _chat(max_tokens=0), 400, "invalid_value"),
    ("max-tokens-negative", _chat(max_tokens=-5), 400, "invalid_value"),
    ("max-tokens-string", _chat(max_tokens="10"), 400, "invalid_value"),
    ("max-tokens-float", _chat(max_tokens=1.5), 400, "invalid_value"),
    ("max-completion-tokens-bool", _chat(max_completion_tokens=True), 400, "invalid_value"),
    ("temperature-negative", _chat(temperature=-0.5), 400, "invalid_value"),
    ("temperature-huge", _chat(temperature=1e308), 400, "invalid_value"),
    ("temperature-string", _chat(temperature="hot"), 400, "invalid_value"),
    ("top-p-zero", _chat(top_p=0), 400, "invalid_value"),
    ("top-p-above-one", _chat(top_p=1.5), 400, "invalid_value"),
    ("n-zero", _chat(n=0), 400, "invalid_value"),
    ("n-too-large", _chat(n=1000), 400, "invalid_value"),
    ("n-above-server-limit", _chat(n=5), 400, "invalid_value"),
    ("n-string", _chat(n="2"), 400, "invalid_value"),
    ("stop-int", _chat(stop=5), 400, "invalid_value"),
    ("stop-list-with-int", _chat(stop=["a", 3]), 400, "invalid_value"),
    ("stop-empty-string", _chat(stop=""), 400, "invalid_value"),
    ("stop-too-many", _chat(stop=[f"s{i}" for i in range(17)]), 400, "invalid_value"),
    ("seed-negative", _chat(seed=-1), 400, "invalid_value"),
    ("seed-huge", _chat(seed=2**70), 400, "invalid_value"),
    ("stream-not-bool", _chat(stream="yes"), 400, "invalid_value"),
    ("stream-options-without-stream", _chat(stream_options={"include_usage": True}), 400, "invalid_value"),
    ("logprobs", _chat(logprobs=True), 400, "invalid_value"),
    ("tools", _chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "invalid_value"),
    ("frequency-penalty", _chat(frequency_penalty=1.0), 400, "invalid_value"),
    ("json-response-format", _chat(response_format={"type": "json_object"}), 400, "invalid_value"),
    ("too-long-prompt", _chat(text="hello world " * 300), 400, "context_length_exceeded"),
    ("max-tokens-beyond-context", _chat(max_tokens=10**9), 400, "context_length_exceeded"),
    ("placeholder-in-text", _chat(text="look: <image> here"), 400, "invalid_value"),
    # --- images: encoding and decoding
    ("bad-base64", _img("data:image/png;base64,@@@@not-base64@@@@"), 400, "invalid_image"),
    ("base64-bad-padding", _img("data:image/png;base64,abc"), 400, "invalid_image"),
    ("data-uri-not-base64", _img("data:image/png,rawbytes"), 400, "invalid_image_url"),
    ("data-uri-text-mime", _img("data:text/plain;base64,aGVsbG8gd29ybGQ="), 400, "invalid_image_url"),
    ("non-image-bytes", _img(data_uri(b"this is certainly not an image" * 10)), 400, "invalid_image"),
    ("empty-image", _img("data:image/png;base64,"), 400, "invalid_image"),
    ("truncated-png", _img(data_uri(TRUNCATED_PNG)), 400, "invalid_image"),
    ("one-pixel-image", _img(data_uri(png_bytes(1, 1))), 400, "image_too_small"),
    ("declared-100000x100000", _img(data_uri(png_header(100_000, 100_000))), 400, "image_too_large"),
    ("declared-5000x5000", _img(data_uri(png_header(5000, 5000))), 400, "image_too_large"),
    ("extreme-aspect-ratio", _img(data_uri(png_bytes(1000, 4))), 400, "invalid_image"),
    ("image-bytes-over-cap", _img(data_uri(b"\x89PNG" + os.urandom(1100 * 1024))), 400, "image_too_large"),
    ("format-not-allowed-tiff", _img(data_uri(png_bytes(16, 16, fmt="TIFF"), "image/tiff")), 400, "invalid_image"),
    ("too-many-images", ("json", chat_body(images=[GOOD, GOOD, GOOD]), "strict"), 400, "too_many_images"),
    ("unsupported-scheme-ftp", _img("ftp://images.test/a.png"), 400, "invalid_image_url"),
    ("javascript-url", _img("javascript:alert(1)"), 400, "invalid_image_url"),
    ("bare-local-path", _img("/etc/passwd"), 400, "invalid_image_url"),
    # --- remote URLs: allow-list
    ("remote-disabled-by-default", _img("http://images.test/img.png"), 400, "media_domain_not_allowed"),
    ("ssrf-127.0.0.1-not-listed", _img("http://127.0.0.1:{port}/img.png"), 400, "media_domain_not_allowed"),
    ("domain-not-allowed", _img("http://evil.test/img.png", "open"), 400, "media_domain_not_allowed"),
    ("allowed-suffix-trick", _img("http://images.test.evil.test/img.png", "open"), 400, "media_domain_not_allowed"),
    ("credentials-in-url", _img("http://user:pw@images.test/img.png", "open"), 400, "invalid_image_url"),
    ("allowed-name-as-userinfo", _img("http://images.test@127.0.0.1:{port}/img.png", "open"), 400,
     "invalid_image_url"),
    ("backslash-in-host", _img("http://evil.test\\.images.test/img.png", "open"), 400, "invalid_image_url"),
    # --- remote URLs: addresses (allow-listed, refused by the address check)
    ("ssrf-127.0.0.1", _img("http://127.0.0.1:{port}/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-localhost", _img("http://localhost:{port}/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-ipv6-loopback", _img("http://[::1]:{port}/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-metadata-169.254.169.254", _img("http://169.254.169.254/latest/meta-data/", "open"), 400,
     "media_address_forbidden"),
    ("ssrf-10.x", _img("http://10.0.0.1/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-172.16.x", _img("http://172.16.0.1/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-192.168.x", _img("http://192.168.1.1/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-decimal-ip", _img("http://2130706433:{port}/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-hex-ip", _img("http://0x7f000001:{port}/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-octal-ip", _img("http://0177.0.0.1:{port}/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-ipv4-mapped-ipv6", _img("http://[::ffff:127.0.0.1]:{port}/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-unspecified", _img("http://0.0.0.0:{port}/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-multicast", _img("http://224.0.0.1/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-dns-to-private", _img("http://internal.test/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-dns-to-metadata", _img("http://meta.test/latest/", "open"), 400, "media_address_forbidden"),
    ("ssrf-dns-one-private-answer", _img("http://rebind.test/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-dns-cgnat", _img("http://cgnat.test/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-dns-mapped-private", _img("http://mapped.test/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-dns-nat64-loopback", _img("http://nat64.test/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-dns-6to4-private", _img("http://sixtofour.test/img.png", "open"), 400, "media_address_forbidden"),
    ("ssrf-dns-teredo", _img("http://teredo.test/img.png", "open"), 400, "media_address_forbidden"),
    # --- redirects from the allowed host
    ("redirect-to-loopback", _img("http://images.test/to-loopback", "open"), 400, "media_address_forbidden"),
    ("redirect-to-private-dns", _img("http://images.test/to-internal", "open"), 400, "media_address_forbidden"),
    ("redirect-to-metadata", _img("http://images.test/to-metadata", "open"), 400, "media_address_forbidden"),
    ("redirect-to-file", _img("http://images.test/to-file", "open"), 400, "invalid_image_url"),
    ("redirect-to-unlisted-domain", _img("http://images.test/to-other", "open"), 400, "media_domain_not_allowed"),
    ("redirect-loop", _img("http://images.test/loop", "open"), 400, "media_fetch_failed"),
    # --- remote content
    ("remote-not-image", _img("http://images.test/text", "open"), 400, "invalid_image"),
    ("remote-404", _img("http://images.test/missing.png", "open"), 400, "media_fetch_failed"),
    ("remote-declared-too-big", _img("http://images.test/declared-big", "open"), 400, "image_too_large"),
    ("remote-streamed-too-big", _img("http://images.test/streamed-big", "open"), 400, "image_too_large"),
    # --- local files
    ("file-url-not-allowed", _img("file:///etc/passwd"), 400, "local_media_not_allowed"),
    ("file-outside-root", _img("file:///etc/passwd", "open"), 400, "local_media_not_allowed"),
    ("file-path-traversal", _img("file://{media}/../secret.png", "open"), 400, "local_media_not_allowed"),
    ("file-encoded-traversal", _img("file://{media}/%2e%2e/secret.png", "open"), 400, "local_media_not_allowed"),
    ("file-symlink-escape", _img("file://{media}/link.png", "open"), 400, "local_media_not_allowed"),
    ("file-missing", _img("file://{media}/nope.png", "open"), 400, "invalid_image"),
    ("file-remote-host", _img("file://otherhost/{media}/good.png", "open"), 400, "invalid_image_url"),
    # --- completions route
    ("completion-prompt-int", ("json", {"model": MODEL, "prompt": 5}, "strict"), 400, "invalid_value"),
    ("completion-prompt-list-of-two", ("json", {"model": MODEL, "prompt": ["a", "b"]}, "strict"), 400, "invalid_value"),
    ("completion-echo", ("json", {"model": MODEL, "prompt": "hi", "echo": True}, "strict"), 400, "invalid_value"),
    ("completion-suffix", ("json", {"model": MODEL, "prompt": "hi", "suffix": "x"}, "strict"), 400, "invalid_value"),
    ("completion-unknown-model", ("json", {"model": "nope", "prompt": "hi"}, "strict"), 404, "model_not_found"),
    ("completion-too-long-prompt", ("json", {"model": MODEL, "prompt": "hello world " * 300}, "strict"), 400,
     "context_length_exceeded"),
]
COMPLETION_CASES = {c[0] for c in CASES if c[0].startswith("completion-")}
# the field each refusal must name (so a case cannot pass by failing on something else, e.g. a broken base body)
IMAGE_PARAM = "messages[0].content[0].image_url"
PARAMS = {
    "missing-model": "model", "missing-messages": "messages", "empty-messages": "messages",
    "messages-not-list": "messages", "message-not-object": "messages[0]", "message-missing-role": "messages[0].role",
    "unknown-role": "messages[0].role", "content-wrong-type": "messages[0].content",
    "user-content-null": "messages[0].content", "unknown-part-type": "messages[0].content[0]",
    "text-part-not-string": "messages[0].content[0].text", "image-url-missing": IMAGE_PARAM + ".url",
    "image-url-not-string": IMAGE_PARAM + ".url", "image-in-assistant-message": "messages[1].content[0].image_url",
    "model-not-string": "model", "unknown-model": "model", "max-tokens-zero": "max_tokens",
    "max-tokens-negative": "max_tokens", "max-tokens-string": "max_tokens", "max-tokens-float": "max_tokens",
    "max-completion-tokens-bool": "max_completion_tokens", "temperature-negative": "temperature",
    "temperature-huge": "temperature", "temperature-string": "temperature", "top-p-zero": "top_p",
    "top-p-above-one": "top_p", "n-zero": "n", "n-too-large": "n", "n-above-server-limit": "n", "n-string": "n",
    "stop-int": "stop", "stop-list-with-int": "stop[1]", "stop-empty-string": "stop", "stop-too-many": "stop",
    "seed-negative": "seed", "seed-huge": "seed", "stream-not-bool": "stream",
    "stream-options-without-stream": "stream_options", "logprobs": "logprobs", "tools": "tools",
    "frequency-penalty": "frequency_penalty", "json-response-format": "response_format",
    "too-many-images": "messages", "completion-prompt-int": "prompt", "completion-prompt-list-of-two": "prompt",
    "completion-echo": "echo", "completion-suffix": "suffix", "completion-unknown-model": "model",
}
REFUSALS: dict[str, tuple] = {}  # case -> (status, code, param, message shape), filled by test_bad_request


def _check_error(r, status, code):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"]
    if code is not None:
        assert err["code"] == code, err
    for bad in FORBIDDEN_TEXT:
        assert bad not in r.text, (bad, r.text)
    return err


def test_the_suite_is_big_enough():
    assert len({c[0] for c in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize("name,request_,status,code", CASES, ids=[c[0] for c in CASES])
def test_bad_request(clients, dialed, name, request_, status, code):
    kind, payload, which = request_
    client = clients[which]
    path = "/v1/completions" if name in COMPLETION_CASES else "/v1/chat/completions"
    if kind == "json":
        text = json.dumps(payload).replace("{port}", str(clients["port"])).replace("{media}", str(clients["media"]))
        r = client.post(path, content=text.encode(), headers={**AUTH, "Content-Type": "application/json"})
    else:
        r = client.post(path, content=payload, headers={**AUTH, "Content-Type": "application/json"})
    err = _check_error(r, status, code)
    if code == "context_length_exceeded":  # the param names the field the client sent
        assert err["param"] == ("prompt" if name in COMPLETION_CASES else "messages"), err
    elif name in PARAMS:
        assert err["param"] == PARAMS[name], err
    elif "image" in code or "media" in code:
        assert err["param"] == IMAGE_PARAM, err
    shape = re.sub(r"\d+", "N", re.sub(r"'[^']*'", "''", err["message"]))  # host names, sizes, counts left out
    REFUSALS[name] = (r.status_code, err["code"], err["param"], shape)
    assert all(is_public_address(ip) for ip in dialed), dialed  # no refused address was ever connected to


def test_the_refusals_are_distinct():
    """Many inputs, many different refusals: the suite is not one check hit a hundred times. (Inputs that
    differ only in how they spell a forbidden address share their refusal by design.)"""
    if len(REFUSALS) < len(CASES):
        pytest.skip("needs the whole bad-request suite in this run")
    assert len(set(REFUSALS.values())) >= 60, sorted(set(REFUSALS.values()))


def test_chunked_body_over_the_cap(clients):
    def body():
        for _ in range(40):
            yield b" " * 65536

    r = clients["strict"].post("/v1/chat/completions", content=body(), headers=AUTH)
    _check_error(r, 413, "request_too_large")


@pytest.mark.parametrize("headers,path", [
    ({}, "/v1/chat/completions"),
    ({"Authorization": "Bearer wrong"}, "/v1/chat/completions"),
    ({"Authorization": f"Basic {base64.b64encode(b'u:' + API_KEY.encode()).decode()}"}, "/v1/chat/completions"),
    ({"Authorization": API_KEY}, "/v1/models"),
    ({}, "/metrics"),
    ({}, "/v1/nope"),
], ids=["missing-key", "wrong-key", "basic-scheme", "key-without-scheme", "metrics-without-key", "unknown-route-without-key"])
def test_auth_refused(clients, headers, path):
    client = clients["strict"]
    r = client.post(path, json=chat_body(), headers=headers) if "completions" in path else client.get(path, headers=headers)
    _check_error(r, 401, "invalid_api_key")


def test_routes_and_methods(clients):
    c = clients["strict"]
    _check_error(c.get("/v1/nope", headers=AUTH), 404, "not_found")
    _check_error(c.get("/v1/chat/completions", headers=AUTH), 405, "method_not_allowed")
    _check_error(c.get("/v1/models/other", headers=AUTH), 404, "model_not_found")


def test_allowed_sources_still_work(clients):
    """The refusals above are not blanket failures: an allowed host, a redirect between allowed hosts and a
    file under the media root load fine."""
    c = clients["open"]
    for url in ("http://images.test/img.png", "http://IMAGES.TEST./img.png", "http://images.test/to-img",
                f"file://{clients['media']}/good.png"):
        r = c.post("/v1/chat/completions", json=chat_body(images=[url]), headers=AUTH)
        assert r.status_code == 200, (url, r.text)


def test_healthy_after_the_suite(clients):
    for c in (clients["strict"], clients["open"]):
        assert c.get("/health").json() == {"status": "ok"}
        r = c.post("/v1/chat/completions", json=chat_body(images=[GOOD]), headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] >= 1
        state = c.app.state.server
        assert state.worker.alive and state.worker.held == 0 and not state.engine.has_work()
    metrics = clients["strict"].get("/metrics", headers=AUTH).text
    assert 'torchvlm_http_requests_total{route="/v1/chat/completions",status="400"}' in metrics
