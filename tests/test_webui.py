"""The web view (/ui) in a real headless Chromium (Debian's, driven by Playwright) against a real
daemon over its real HTTP API: a question streams into the stage panels with confidence shading,
a rating reaches the learner, memories are listed, searched and forgotten from the page."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from mirador.runtime.router import classify

from .conftest import daemon_in_new_home

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium; .ci/run does)")

# The router sends this one through all three stages (analysis asked for, several parts).
QUESTION = "Compare the risks and trade-offs of Python and Rust for a database server, and explain why?"
TIMEOUT_MS = 240_000  # three stages of SmolLM2 on two busy cores


@pytest.fixture(scope="module")
def web_daemon():
    """A daemon with short stage answers; its HTTP API on a free port (conftest), found in its status."""
    config = "".join(f"[stages.{stage}]\nmax_tokens = 20\n" for stage in ("quick", "deep", "synthesis"))
    for d in daemon_in_new_home({"mirador.toml": config}):
        with d.home.client() as client:
            d.url = client.status()["http"].rstrip("/")
        yield d


@pytest.fixture(scope="module")
def page(web_daemon):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra: scripts/setup.sh --test")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.console_errors = []
        page.on("pageerror", lambda exc: page.console_errors.append(str(exc)))
        yield page
        browser.close()


@pytest.fixture(scope="module")
def answered(web_daemon, page):
    """The page after asking QUESTION and the answer completing (Enter asks)."""
    page.goto(f"{web_daemon.url}/ui")
    page.locator("#question").fill(QUESTION)
    page.locator("#question").press("Enter")
    page.wait_for_selector("#answer[data-state=done]", timeout=TIMEOUT_MS)
    return page


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("MIRADOR_SCREENSHOT_DIR"):
        target = Path(os.environ["MIRADOR_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


def test_page_loads_from_the_daemon_with_its_status(web_daemon, page):
    response = page.goto(f"{web_daemon.url}/")  # a browser at the root is sent to the web view
    assert response.ok and page.url == f"{web_daemon.url}/ui" and page.title() == "Mirador"
    page.wait_for_function("document.getElementById('daemon').textContent.includes('pid')")
    assert page.locator("#question").evaluate("el => el === document.activeElement")
    assert page.locator("#errors").inner_text() == ""


def test_a_question_streams_into_the_panels_of_the_stages_the_route_ran(answered, tmp_path):
    page = answered
    save_screenshot(page, tmp_path, "webui-answer.png")  # first, so that a failure below has it too
    route = classify(QUESTION)
    assert page.locator("#route").get_attribute("data-route") == route.kind == "complex"
    assert page.locator("#reason").inner_text() == route.reason
    stages = page.locator("#stages").get_attribute("data-stages").split(",")
    assert stages == ["quick", "deep", "synthesis"]
    assert page.locator(".stage").evaluate_all("els => els.map(e => e.dataset.stage)") == stages
    for stage in stages:
        panel = page.locator(f'.stage[data-stage="{stage}"]')
        shown = f"{stage} panel: {panel.inner_text()!r}"  # what the page shows, should this fail
        assert panel.get_attribute("data-state") == "done", shown
        assert panel.locator(".stage-model").inner_text() == "smollm2-135m", shown
        assert panel.locator(".stage-text").inner_text().strip(), shown
        tokens = panel.locator(".tok").evaluate_all(
            "els => els.map(e => [e.dataset.confidence, e.dataset.band, e.style.getPropertyValue('--c'), e.title])")
        assert tokens, shown
        for confidence, band, shade, title in tokens:
            c = float(confidence)
            assert 0 <= c <= 1 and abs(float(shade) - c) <= 0.0005 and title.startswith("confidence "), (confidence, shade, title)
            assert band == ("high" if c >= 0.9 else "mid" if c >= 0.7 else "low"), (confidence, band)
        stats = panel.locator(".stage-stats")
        assert float(stats.get_attribute("data-first-token-s")) > 0, shown
        assert float(stats.get_attribute("data-tokens-per-s")) > 0, shown
        assert "first token" in stats.inner_text() and "tok/s" in stats.inner_text(), shown
    # The plan's last stage writes the answer; the rest is shown as thinking.
    assert page.locator(".stage.is-answer").get_attribute("data-stage") == "synthesis"
    assert page.locator("#recalled-count").inner_text() == "0"  # a fresh home remembers nothing yet
    assert page.locator("#answer").get_attribute("data-query-id")
    assert page.locator("#errors").inner_text() == "" and page.console_errors == []


def test_a_rating_from_the_page_reaches_the_learner(web_daemon, answered, tmp_path):
    page = answered
    query_id = page.locator("#answer").get_attribute("data-query-id")
    page.locator('#rating button[data-score="4"]').click()
    page.wait_for_selector("#rating[data-rated='4']")
    assert page.locator('#rating button[data-score="4"]').get_attribute("aria-pressed") == "true"
    assert "rated 4/5" in page.locator("#rating-result").inner_text()
    with web_daemon.home.client() as client:
        types = client.learn("stats")["types"]
    plans = [p for t in types for p in t["plans"]]
    assert plans == [{"plan": "quick+deep+synthesis", "ratings": 1, "mean_rating": 4.0}], (query_id, types)
    page.locator("#memory-items li.memory", has_text=QUESTION).wait_for()  # for the screenshot
    save_screenshot(page, tmp_path, "webui-rated.png")


def _newest_until(page, question: str, timeout: float = 60):
    """Clicks "Newest" until the exchange is listed (it is stored just after the answer ends)."""
    deadline = time.monotonic() + timeout
    item = page.locator("#memory-items li.memory", has_text=question)
    while item.count() == 0:
        assert time.monotonic() < deadline, f"the page never listed the memory of {question!r}"
        page.locator("#memory-list").click()
        page.wait_for_function("document.getElementById('memory-note').textContent !== '…'")
        time.sleep(0.5)
    return item


def test_memories_are_listed_searched_and_forgotten_from_the_page(web_daemon, answered, tmp_path):
    page = answered
    item = page.locator("#memory-items li.memory", has_text=QUESTION)
    item.wait_for()  # the page lists the new exchange by itself once it is stored
    memory_id = item.get_attribute("data-id")
    assert item.locator(".memory-answer").inner_text().strip()

    page.locator("#memory-query").fill("Rust versus Python database risks")
    page.locator("#memory-query").press("Enter")
    page.wait_for_selector("#memory-items[data-query='Rust versus Python database risks']")
    found = page.locator(f'#memory-items li.memory[data-id="{memory_id}"]')
    assert "similarity" in found.locator(".memory-meta").inner_text()

    found.locator("button.forget").click()
    page.wait_for_selector(f'#memory-items li.memory[data-id="{memory_id}"]', state="detached")
    assert memory_id in page.locator("#memory-note").inner_text()
    with web_daemon.home.client() as client:
        assert memory_id not in [r["id"] for r in client.memory("list", limit=100)["records"]]
    page.locator("#memory-query").press("Enter")  # searched again: gone from the daemon too
    page.wait_for_function("document.getElementById('memory-note').textContent !== '…'")
    assert page.locator(f'#memory-items li.memory[data-id="{memory_id}"]').count() == 0
    assert page.locator("#errors").inner_text() == ""


def test_an_api_error_is_shown_in_the_page(web_daemon, page):
    """A memory forgotten elsewhere (here by the Python client) and then forgotten again from a
    list the page still shows: the daemon's 404 message appears in the page, as it says it."""
    with web_daemon.home.client() as client:
        list(client.ask("Name a colour.", stages=["quick"], max_tokens=4))
    page.goto(f"{web_daemon.url}/ui")
    item = _newest_until(page, "Name a colour.")
    memory_id = item.get_attribute("data-id")
    with web_daemon.home.client() as client:
        client.memory("forget", target=memory_id)
    item.locator("button.forget").click()
    error = page.locator("#errors .error")
    error.wait_for()
    assert memory_id in error.inner_text() and "forget failed" in error.inner_text()


def test_an_incognito_question_runs_only_its_route_and_is_not_kept(web_daemon, page):
    question = "Name a fruit."
    assert classify(question).kind == "simple"  # the quick stage alone
    page.goto(f"{web_daemon.url}/ui")
    page.locator("#incognito").check()
    page.locator("#question").fill(question)
    page.locator("#question").press("Enter")
    page.wait_for_selector("#answer[data-state=done]", timeout=TIMEOUT_MS)
    assert page.locator(".stage").evaluate_all("els => els.map(e => e.dataset.stage)") == ["quick"]
    assert page.locator('.stage[data-stage="quick"] .tok[data-confidence]').count() > 0
    assert page.locator('.stage[data-stage="quick"]').get_attribute("class").split() == ["stage", "is-answer"]
    assert page.locator('#rating button[data-score="5"]').is_disabled()  # nothing kept, nothing to rate
    assert "incognito" in page.locator("#rating-result").inner_text()
    time.sleep(2)  # a stored exchange would be on disk by now (~0.3 s)
    with web_daemon.home.client() as client:
        assert question not in [r["question"] for r in client.memory("list", limit=100)["records"]]


def test_the_memories_a_question_recalls_are_shown(web_daemon, page):
    with web_daemon.home.client() as client:
        list(client.ask("My favourite colour is teal.", stages=["quick"], max_tokens=4))
    page.goto(f"{web_daemon.url}/ui")
    page.locator("#question").fill("What is my favourite colour?")
    page.locator("#question").press("Enter")
    page.wait_for_selector("#answer[data-state=done]", timeout=TIMEOUT_MS)
    assert page.locator("#recalled").get_attribute("open") is not None  # shown open when there are some
    recalled = page.locator("#recalled-list li", has_text="My favourite colour is teal.")
    assert recalled.count() == 1 and recalled.locator(".sim").inner_text().endswith("%")
    assert int(page.locator("#recalled-count").inner_text()) >= 1
