"""The search web page in a real browser: headless Chromium driven by Playwright against a live
uvicorn on loopback, serving an index of the sample photos built with a tiny model.

Skipped only when Playwright or Chromium is missing (CI installs both).  Set CLIPFORGE_CHROMIUM
to use another Chromium binary than /usr/bin/chromium.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.search import SearchIndex, build_index
from clipforge.search.server import create_app, running_server

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed (pip install playwright)")
expect = sync_api.expect

CHROMIUM = os.environ.get("CLIPFORGE_CHROMIUM", "/usr/bin/chromium")
if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
    pytest.skip(f"no Chromium at {CHROMIUM} (set CLIPFORGE_CHROMIUM)", allow_module_level=True)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 10_000
MAX_UPLOAD = 1_500_000  # above every sample photo, so that a 2 MB file gets a 413
TOKEN = "browser-test-token_0123456789"


@pytest.fixture(scope="module")
def index(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SearchIndex:
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit")
    out = tmp_path_factory.mktemp("browser") / "index"
    build_index(photo_dir, out, model)
    return SearchIndex.open(out, model)


@pytest.fixture(scope="module")
def server_url(index: SearchIndex) -> Iterator[str]:
    with running_server(create_app(index, max_upload_bytes=MAX_UPLOAD)) as url:
        yield url


@pytest.fixture(scope="module")
def token_server_url(index: SearchIndex) -> Iterator[str]:
    """The same index behind an access token."""
    with running_server(create_app(index, token=TOKEN)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server_url: str) -> Iterator[object]:
    """A fresh page on the search page; fails the test if it requests anything off the server,
    runs into a script error, or breaks the server's Content-Security-Policy."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    elsewhere, script_errors = [], []
    page.on("request", lambda r: None if r.url.startswith(server_url)
            or r.url.startswith(("blob:", "data:")) else elsewhere.append(r.url))
    page.on("pageerror", lambda exc: script_errors.append(str(exc)))
    page.on("console", lambda m: script_errors.append(m.text)
            if "Content Security Policy" in m.text else None)
    page.goto(server_url + "/")
    expect(page.get_by_test_id("index-info")).to_contain_text("8 items")
    yield page
    context.close()
    assert elsewhere == [] and script_errors == []


def cards(page):
    return page.get_by_test_id("result-card")


def search(page, text: str) -> None:
    page.get_by_label("Search by text").fill(text)
    page.get_by_test_id("search-submit").click()


def test_text_search_shows_cards_with_scores(page) -> None:
    search(page, "a cat on a sofa")
    expect(page.get_by_test_id("status")).to_have_text(re.compile(r"^8 results .* in \d+ ms$"))
    expect(cards(page)).to_have_count(8)
    scores = [float(s) for s in page.get_by_test_id("result-score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    first = cards(page).first
    expect(first.get_by_role("img")).to_have_attribute("src", re.compile(r"^/thumbnails/\d+$"))
    expect(first.get_by_role("img")).to_have_attribute("alt", re.compile(r"\w"))
    # The thumbnail really loaded (a broken image has no natural width).
    first.get_by_role("img").evaluate("img => img.decode()")
    assert first.get_by_role("img").evaluate("img => img.naturalWidth") > 0
    assert "q=a+cat+on+a+sofa" in page.url


def test_image_upload_finds_the_same_photo(page, photo_dir: Path) -> None:
    page.get_by_test_id("file-input").set_input_files(photo_dir / "rocket.jpg")
    expect(page.get_by_test_id("status")).to_contain_text("rocket.jpg")
    expect(cards(page)).to_have_count(8)
    first = cards(page).first
    expect(first.get_by_test_id("result-name")).to_have_text("rocket.jpg")
    assert float(first.get_by_test_id("result-score").inner_text()) == pytest.approx(1, abs=3e-3)
    expect(page.get_by_test_id("query-preview")).to_be_visible()


def test_more_like_this_replaces_the_grid_without_the_item(page) -> None:
    search(page, "a photo")
    expect(cards(page)).to_have_count(8)
    second = cards(page).nth(1)
    item_id = second.get_attribute("data-id")
    name = second.get_by_test_id("result-name").inner_text()
    second.get_by_role("button", name=f"More like {name}").click()
    expect(page.get_by_test_id("status")).to_contain_text(f"like item {item_id}")
    expect(cards(page)).to_have_count(7)
    expect(page.locator(f'[data-testid="result-card"][data-id="{item_id}"]')).to_have_count(0)
    expect(page.get_by_test_id("error")).to_be_hidden()


def test_errors_from_the_api_are_shown(page, photo_dir: Path) -> None:
    search(page, "a cat")
    expect(cards(page)).to_have_count(8)
    error = page.get_by_test_id("error")
    page.get_by_test_id("file-input").set_input_files(
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image at all"})
    expect(error).to_be_visible()
    expect(error).to_contain_text("400")
    expect(error).to_contain_text("not an image")
    expect(cards(page)).to_have_count(0)  # no stale answer under the error
    expect(page.get_by_test_id("query-preview")).to_be_hidden()
    page.get_by_test_id("file-input").set_input_files(
        {"name": "huge.png", "mimeType": "image/png", "buffer": b"\0" * 2_000_000})
    expect(error).to_contain_text("413")
    expect(error).to_contain_text(str(MAX_UPLOAD))
    # An over-long text: the tokenizer's reason reaches the page; a good query clears it.
    search(page, "a very long query " * 30)
    expect(error).to_contain_text("context length")
    search(page, "a cat")
    expect(error).to_be_hidden()
    expect(cards(page)).to_have_count(8)


def test_where_shows_the_map_over_an_image_result_and_hides_it_again(page, index) -> None:
    """"Where?" on a result of a text search fetches the overlay for the query's text and shows
    it in place of the thumbnail (a data: PNG, which the page's policy allows); its peak and
    box are the server's; a second click brings the thumbnail back.  Results of a query
    without a text ("more like this") have no such control."""
    search(page, "a red rocket")
    expect(cards(page)).to_have_count(8)
    first = cards(page).first
    img, where = first.get_by_role("img"), first.get_by_test_id("locate")
    name = first.get_by_test_id("result-name").inner_text()
    expect(where).to_have_attribute("aria-pressed", "false")
    first.get_by_role("button", name=f"Where is “a red rocket” in {name}").click()
    expect(img).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    expect(where).to_have_attribute("aria-pressed", "true")
    img.evaluate("img => img.decode()")
    assert img.evaluate("img => img.naturalWidth") > 0
    item = int(first.get_attribute("data-id"))
    with index.open_image(item) as image:
        expected = index.locate(image.convert("RGB"), "a red rocket")
    assert first.get_attribute("data-peak") == ",".join(map(str, expected.peak))
    assert first.get_attribute("data-box") == ",".join(map(str, expected.box))
    where.click()
    expect(img).to_have_attribute("src", re.compile(r"^/thumbnails/\d+$"))
    expect(where).to_have_attribute("aria-pressed", "false")
    where.click()  # shown again from the map already fetched
    expect(img).to_have_attribute("src", re.compile(r"^data:image/png"))
    first.get_by_role("button", name=re.compile("^More like")).click()
    expect(page.get_by_test_id("status")).to_contain_text("like item")
    expect(page.get_by_test_id("locate")).to_have_count(0)
    expect(page.get_by_test_id("error")).to_be_hidden()


def test_api_docs_render_offline(page, server_url: str) -> None:
    """/docs draws the OpenAPI page from scripts the server itself serves (none off-site)."""
    page.goto(server_url + "/docs")
    expect(page.get_by_text("/api/search/image").first).to_be_visible()


def test_page_asks_for_the_token_once_and_sends_it_only_in_a_header(browser,
                                                                    token_server_url: str,
                                                                    photo_dir: Path) -> None:
    """Behind a token: the page asks for it at the first 401, runs the refused query again,
    shows thumbnails fetched with the header (an <img src> cannot send it), keeps the token
    for the tab, and never puts it in a URL."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    sent, problems = [], []
    page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))))
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("console", lambda m: problems.append(m.text)
            if "Content Security Policy" in m.text else None)
    page.goto(token_server_url + "/")
    expect(page.get_by_test_id("index-info")).to_contain_text("8 items")  # /healthz is open
    token_form, error = page.get_by_test_id("token-form"), page.get_by_test_id("error")
    expect(token_form).to_be_hidden()

    search(page, "a cat")
    expect(error).to_contain_text("401")
    expect(token_form).to_be_visible()
    page.get_by_label("This server needs its access token").fill("wrong-token-0123456789")
    page.get_by_test_id("token-submit").click()
    expect(error).to_contain_text("not valid")
    expect(token_form).to_be_visible()
    page.get_by_label("This server needs its access token").fill(TOKEN)
    page.get_by_test_id("token-submit").click()
    expect(token_form).to_be_hidden()
    expect(cards(page)).to_have_count(8)  # the refused query, run again with the token
    expect(error).to_be_hidden()
    first = cards(page).first.get_by_role("img")
    expect(first).to_have_attribute("src", re.compile(r"^blob:"))
    first.evaluate("img => img.decode()")
    assert first.evaluate("img => img.naturalWidth") > 0

    # Asked once: the other queries and a reload of the page go on without asking.
    second = cards(page).nth(1)
    item_id = second.get_attribute("data-id")
    second.get_by_role("button", name=re.compile("^More like")).click()
    expect(page.get_by_test_id("status")).to_contain_text(f"like item {item_id}")
    page.reload()
    expect(page.get_by_test_id("status")).to_contain_text("8 results")  # ?q= from the URL
    page.get_by_test_id("file-input").set_input_files(photo_dir / "rocket.jpg")
    expect(cards(page).first.get_by_test_id("result-name")).to_have_text("rocket.jpg")
    expect(token_form).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('clipforge-token')") == TOKEN

    # the map of a result is fetched with the header too
    search(page, "a cat")
    cards(page).first.get_by_test_id("locate").click()
    expect(cards(page).first.get_by_role("img")).to_have_attribute(
        "src", re.compile(r"^data:image/png"))
    assert any("/locate?" in url for url, _ in sent)

    guarded = [(url, auth) for url, auth in sent if "/api/" in url or "/thumbnails/" in url]
    assert [auth for _, auth in guarded[:2]] == [None, "Bearer wrong-token-0123456789"]
    assert len(guarded) > 20 and all(auth == f"Bearer {TOKEN}" for _, auth in guarded[2:])
    assert all(TOKEN not in url for url, _ in sent) and TOKEN not in page.url
    context.close()
    assert problems == []
