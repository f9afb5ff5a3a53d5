"""The web chat page in headless Chromium (Debian's ``chromium`` driven by Playwright; no browser download):
type a prompt, attach an image, watch the streamed answer appear, take a screenshot and check it."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from serve_util import API_KEY, MODEL, data_uri, png_bytes

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("TORCHVLM_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def test_chat_page_streams_an_answer(browser, live, tmp_path):
    import httpx

    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes(64, 48, seed=5))
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(live.url + "/")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#model-name:not(:empty)")  # (the page's CSP forbids eval, so no wait_for_function)
    assert page.text_content("#model-name") == MODEL
    page.fill("#max-tokens", "12")
    page.fill("#prompt", "What is in this image?")
    page.set_input_files("#image", str(image))
    page.wait_for_selector("#preview img")
    page.click("#send")
    page.wait_for_selector(".answer[data-done='true']", timeout=60_000)
    answer = page.text_content(".answer .text")
    chunks = int(page.get_attribute(".answer", "data-chunks") or 0)
    shot = tmp_path / "chat_page.png"
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    assert not errors, errors

    # the page's streamed answer is the API's greedy answer to the same message
    body = {"model": MODEL, "max_tokens": 12, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image.read_bytes())}},
        {"type": "text", "text": "What is in this image?"}]}]}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=60)
    expected = r.json()["choices"][0]["message"]["content"]
    assert answer == expected and answer.strip()
    assert chunks >= 2  # it arrived in several SSE chunks

    # the screenshot shows a page: not blank, several colours (header, bubbles, the attached image)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 600
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    print(f"screenshot: {shot}")


def test_page_loads_without_key_but_api_needs_it(browser, live):
    page = browser.new_page()
    page.goto(live.url + "/")
    page.wait_for_selector("#status:not(:empty)")
    assert "API key" in page.text_content("#status")
    page.close()
