"""The media policy on its own (no app): the overall fetch deadline against servers that trickle bytes, https
to the checked address with the certificate verified for the name, host spelling normalization against the
allow-list, and the address classification table."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading

import pytest

from serve_util import png_bytes
from torchvlm.errors import TorchVLMError
from torchvlm.serve import ServeConfig
from torchvlm.serve.media import MediaError, MediaPolicy, is_public_address, normalize_host

PUBLIC_IP = "93.184.216.34"


class _Listener:
    """A loopback TCP server running ``handle(conn)`` per connection in a thread; ``stop`` ends them."""

    def __init__(self, handle, wrap=None):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handle, self.wrap = handle, wrap
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn):
        try:
            if self.wrap is not None:
                conn = self.wrap(conn)
            self.handle(conn, self.stopped)
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def close(self):
        self.stopped.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        for t in self.threads:
            t.join(5)


def _policy(port, **kw):
    def dial(ip, p, timeout):
        assert ip == PUBLIC_IP  # only the checked address is ever dialled
        return socket.create_connection(("127.0.0.1", port), timeout=timeout)

    cfg = ServeConfig(allowed_media_domains=("images.test", "other.test"), resolver=lambda h, p: [PUBLIC_IP],
                      dial=dial, **kw)
    return MediaPolicy(cfg)


def _read_request(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


# ------------------------------------------------------------------------------------------ deadline
def _drip_headers(conn, stopped):
    _read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    while not stopped.wait(0.05):  # a header line every 50 ms, forever (each read alone is fast)
        conn.sendall(b"X-Slow: 1\r\n")


def _drip_body(conn, stopped):
    _read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
    while not stopped.wait(0.05):
        conn.sendall(b"x")


@pytest.mark.parametrize("handler", [_drip_headers, _drip_body], ids=["headers", "body"])
def test_a_trickling_server_cannot_outlast_the_fetch_deadline(handler):
    server = _Listener(handler)
    policy = _policy(server.port, media_fetch_timeout=0.5)
    result = []

    def fetch():
        try:
            policy.load("http://images.test/a.png")
        except MediaError as e:
            result.append(e)

    thread = threading.Thread(target=fetch, daemon=True)
    try:
        thread.start()
        # the server would go on forever and each read alone is fast, so only the overall deadline ends the
        # fetch; the bound is loose on purpose (20x the deadline): what matters is that it ends
        thread.join(10)
        assert not thread.is_alive(), "the fetch outlived its deadline"
    finally:
        server.close()
        thread.join(10)
    (e,) = result
    assert e.code == "media_fetch_failed" and "timed out" in str(e)


# ------------------------------------------------------------------------------------------ https
@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """A TLS image host on loopback with a certificate for images.test only (self-signed, made by the openssl
    command); records the SNI names it was asked for."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command")
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=images.test",
                    "-addext", "subjectAltName=DNS:images.test"], check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    sni = []
    ctx.sni_callback = lambda sock, name, _ctx: sni.append(name)
    image = png_bytes(16, 16, seed=4)

    def handle(conn, stopped):
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\nContent-Length: "
                     + str(len(image)).encode() + b"\r\n\r\n" + image)

    server = _Listener(handle, wrap=lambda c: ctx.wrap_socket(c, server_side=True))
    yield server, ssl.create_default_context(cafile=str(cert)), sni
    server.close()


def test_https_goes_to_the_checked_address_and_verifies_the_name(tls_server):
    server, client_ctx, sni = tls_server
    policy = _policy(server.port, tls_context=client_ctx)
    img = policy.load("https://images.test/a.png")
    assert img.size == (16, 16) and img.mode == "RGB"
    assert sni[-1] == "images.test"  # SNI carries the name although the connection went to an address


def test_https_certificate_for_another_name_is_refused(tls_server):
    server, client_ctx, sni = tls_server
    policy = _policy(server.port, tls_context=client_ctx)
    with pytest.raises(MediaError) as e:  # other.test resolves (and is dialled) like images.test
        policy.load("https://other.test/a.png")
    assert e.value.code == "media_fetch_failed" and sni[-1] == "other.test"


def test_https_with_the_system_cas_refuses_the_test_certificate(tls_server):
    server, _, _ = tls_server
    with pytest.raises(MediaError) as e:
        _policy(server.port).load("https://images.test/a.png")
    assert e.value.code == "media_fetch_failed"


# ------------------------------------------------------------------------------------------ hosts
@pytest.mark.parametrize("host,expected", [
    ("images.test", "images.test"),
    ("IMAGES.Test.", "images.test"),
    ("[::1]", "::1"),
    ("::FFFF:127.0.0.1", "::ffff:7f00:1"),
    ("bücher.test", "xn--bcher-kva.test"),
    ("ｉｍａｇｅｓ.test", "images.test"),  # fullwidth letters: IDNA maps them to ASCII
    ("evil.test\\.images.test", None),
    ("a..images.test", None),
    ("images.test%00", None),
    ("ima ges.test", None),
    ("-images.test", None),
    ("", None),
    (".", None),
])
def test_normalize_host(host, expected):
    assert normalize_host(host) == expected


def test_allow_list_matches_normalized_names():
    policy = MediaPolicy(ServeConfig(allowed_media_domains=("Images.Test.", "*.CDN.test", "[2606:4700::1111]",
                                                            "xn--bcher-kva.test")))
    assert policy.domains == ("images.test", "*.cdn.test", "2606:4700::1111", "xn--bcher-kva.test")
    for host in ("images.test", "IMAGES.TEST.", "a.cdn.test", "a.b.CDN.test.", "2606:4700:0::1111", "bücher.test"):
        assert policy.host_allowed(host), host
    for host in ("cdn.test", "images.test.evil", "evil.test\\.images.test", "x.images.test", "a..cdn.test",
                 "2606:4700::1112", "buecher.test"):
        assert not policy.host_allowed(host), host


@pytest.mark.parametrize("entry", ["*", "*.", "exa mple.com", "http://example.com", "*.[::1]"])
def test_bad_allow_list_entries_are_refused_at_startup(entry):
    with pytest.raises(TorchVLMError, match="allowed media domain"):
        MediaPolicy(ServeConfig(allowed_media_domains=(entry,)))


def test_a_url_with_an_unusable_host_is_refused_before_any_lookup():
    looked_up = []
    policy = MediaPolicy(ServeConfig(allowed_media_domains=("*.images.test",),
                                     resolver=lambda h, p: looked_up.append(h) or [PUBLIC_IP]))
    for url in ("http://evil.test\\.images.test/a.png", "http://a..images.test/a.png"):
        with pytest.raises(MediaError) as e:
            policy.load(url)
        assert e.value.code == "invalid_image_url", url
    assert looked_up == []


# ------------------------------------------------------------------------------------------ addresses
@pytest.mark.parametrize("ip,public", [
    ("93.184.216.34", True), ("2606:4700::1111", True), ("::ffff:8.8.8.8", True), ("64:ff9b::808:808", True),
    ("2002:808:808::1", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.0.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("100.100.100.200", False), ("168.63.129.16", False),
    ("0.0.0.0", False), ("255.255.255.255", False), ("224.0.0.1", False), ("240.0.0.1", False),
    ("192.0.2.1", False), ("198.18.0.1", False),
    ("::1", False), ("::", False), ("fe80::1%eth0", False), ("fc00::1", False), ("fd00:ec2::254", False),
    ("fec0::1", False), ("ff02::1", False), ("2001:db8::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("::127.0.0.1", False), ("::ffff:0:7f00:1", False),
    ("64:ff9b::7f00:1", False), ("64:ff9b::a9fe:a9fe", False), ("64:ff9b:1::808:808", False),
    ("2002:7f00:1::1", False), ("2002:a9fe:a9fe::1", False),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
    ("not-an-ip", False), ("", False),
])
def test_address_classification(ip, public):
    assert is_public_address(ip) is public


# ------------------------------------------------------------------------------------------ decoding
def _png_with_chunk(kind: bytes, data: bytes) -> bytes:
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "PNG")
    png = buf.getvalue()
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return png[:33] + chunk + png[33:]  # right after IHDR


@pytest.mark.parametrize("kind,prefix", [(b"zTXt", b"k\0\0"), (b"iCCP", b"p\0\0"), (b"iTXt", b"k\0\1\0\0\0")],
                         ids=["zTXt", "iCCP", "iTXt"])
def test_compressed_metadata_bombs_are_refused(kind, prefix):
    import zlib

    bomb = _png_with_chunk(kind, prefix + zlib.compress(b"\0" * (16 * 1024 * 1024), 9))  # ~16 KB -> 16 MB
    assert len(bomb) < 64 * 1024
    with pytest.raises(MediaError) as e:
        MediaPolicy(ServeConfig()).decode(bomb)
    assert e.value.code == "invalid_image"


def test_an_animated_gif_gives_its_first_frame():
    import io

    from PIL import Image

    frames = [Image.new("RGB", (64, 64), (i, 255 - i, 0)) for i in range(0, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    img = MediaPolicy(ServeConfig()).decode(buf.getvalue())
    assert img.size == (64, 64) and img.mode == "RGB"
    assert img.getpixel((0, 0)) == (0, 255, 0)  # frame 0's colour (the last frame's is (199, 56, 0))
