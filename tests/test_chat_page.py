"""The chat page at / in a real headless Chromium: streamed replies rendered as Markdown,
Stop (the server cancels), the max-tokens marker, a multi-line input, and a conversation
whose state and stats agree after an error.

Needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`)
and selenium (dev extra); skipped when the browser is absent. Set OFFLOAD_CHAT_SCREENSHOT
to a .png path to keep a screenshot of the page with its reply.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest

from offload_engine.decode.api import load
from offload_engine.server.app import ServerConfig
from tests.test_server import TIMEOUT, LiveServer, httpx  # also skips without the extra

webdriver = pytest.importorskip("selenium.webdriver")
pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("no chromium + chromedriver (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1100,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def live(qwen2_q):
    with load(qwen2_q, device="cpu", progress=False) as engine, \
            LiveServer(engine, ServerConfig(max_batch=2)) as server:
        yield server


def _open(browser, live, **fields) -> WebDriverWait:
    browser.get(live.url + "/")
    wait = WebDriverWait(browser, TIMEOUT)
    wait.until(lambda d: live.service.model_id in d.find_element(By.ID, "model").text)
    for field, value in fields.items():
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    return wait


def _rendered_text(browser, markdown: str) -> str:
    """What the page's renderer shows for ``markdown``, as the DOM's text."""
    return browser.execute_script(
        "const d = document.createElement('div'); d.innerHTML = renderMarkdown(arguments[0]);"
        "document.body.appendChild(d); const t = d.innerText; d.remove(); return t;", markdown)


def test_page_streams_a_reply_and_shows_its_stats(live, browser):
    wait = _open(browser, live, **{"temperature": "0", "max-tokens": "12", "system": "Be brief."})
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("What is a list?", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "Briefly.")
    prompt.send_keys(Keys.ENTER)  # Enter sends; Shift+Enter made the new line
    wait.until(lambda d: "none yet" not in d.find_element(By.ID, "stats").text)
    shown = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .content").text
    stats = browser.find_element(By.ID, "stats").text
    notes = [n.text for n in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .note")]
    if os.environ.get("OFFLOAD_CHAT_SCREENSHOT"):
        browser.save_screenshot(os.environ["OFFLOAD_CHAT_SCREENSHOT"])
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == \
        "What is a list?\nBriefly."
    expected = httpx.post(f"{live.url}/v1/chat/completions", timeout=TIMEOUT, json={
        "temperature": 0, "max_tokens": 12,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "What is a list?\nBriefly."}]}).json()
    reply, finish = expected["choices"][0]["message"]["content"], \
        expected["choices"][0]["finish_reason"]
    # the DOM's text normalises whitespace (\r becomes \n, edges are trimmed): compare words
    assert shown.split() == _rendered_text(browser, reply).split() and shown.strip()
    assert f"{expected['usage']['completion_tokens']} tokens" in stats
    assert "MiB/token" in stats and "first token" in stats
    assert (notes == ["stopped at max tokens (12); raise Max tokens for more"]) == \
        (finish == "length")


def test_markdown_is_rendered_and_html_stays_text(live, browser):
    _open(browser, live)
    html = browser.execute_script("return renderMarkdown(arguments[0])", (
        "# Sorting\n\nUse **sorted** or `list.sort()`:\n\n```python\nxs = [3, 1]\n"
        "xs.sort()  # <in place>\n```\n\n- one *item*\n- two\n\n1. first\n2. second\n\n"
        "<img src=x onerror=alert(1)> [docs](https://docs.python.org) [x](javascript:alert(1))"))
    assert "<h1>Sorting</h1>" in html
    assert "<strong>sorted</strong>" in html and "<code>list.sort()</code>" in html
    assert '<pre><code class="language-python">xs = [3, 1]\nxs.sort()  # &lt;in place&gt;' \
        "</code></pre>" in html
    assert "<ul><li>one <em>item</em></li><li>two</li></ul>" in html
    assert "<ol><li>first</li><li>second</li></ol>" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "<img" not in html
    assert '<a href="https://docs.python.org"' in html and 'href="javascript' not in html
    streaming = browser.execute_script("return renderMarkdown(arguments[0])",
                                       "Here:\n```js\nlet a = 1;")  # fence not closed yet
    assert '<pre><code class="language-js">let a = 1;</code></pre>' in streaming


def _slow_steps(scheduler, seconds: float = 0.05):
    step = scheduler.step

    def slow_step():
        time.sleep(seconds)
        step()

    scheduler.step = slow_step


def test_stop_aborts_the_stream_and_the_server_cancels(live, browser):
    wait = _open(browser, live, **{"temperature": "0", "max-tokens": "200"})
    before = live.metrics()["requests_cancelled"]
    _slow_steps(live.service.scheduler)
    try:
        browser.find_element(By.ID, "prompt").send_keys("Tell me about lists", Keys.ENTER)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant .content").text)
        browser.find_element(By.ID, "stop").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .note"))
        live.wait_metrics(lambda m: m["requests_cancelled"] == before + 1)
    finally:
        del live.service.scheduler.step
    assert browser.find_element(By.CSS_SELECTOR, ".note").text == "stopped by you"
    assert "stopped by you" in browser.find_element(By.ID, "stats").text
    turns = browser.execute_script("return turns")
    assert [t["role"] for t in turns] == ["user", "assistant"] and turns[1]["content"]
    assert browser.find_element(By.ID, "send").is_enabled()
    assert not browser.find_element(By.ID, "stop").is_enabled()


def test_after_an_error_the_conversation_and_stats_agree(live, browser):
    wait = _open(browser, live, **{"temperature": "0", "max-tokens": "100000"})
    browser.find_element(By.ID, "prompt").send_keys("Too long a reply", Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
    error = browser.find_element(By.CSS_SELECTOR, ".msg.error").text
    assert "exceeds" in error and "failed" in browser.find_element(By.ID, "stats").text
    assert browser.execute_script("return turns") == []
    assert "unsent" in browser.find_element(By.CSS_SELECTOR, ".msg.user").get_attribute("class")
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("4")
    browser.find_element(By.ID, "prompt").send_keys("Hello", Keys.ENTER)
    wait.until(lambda d: re.match(r"last reply: \d+ tokens", d.find_element(By.ID, "stats").text))
    turns = browser.execute_script("return turns")
    assert [t["role"] for t in turns] == ["user", "assistant"]  # the failed one is not sent
    assert turns[0]["content"] == "Hello"
    expected = httpx.post(f"{live.url}/v1/chat/completions", timeout=TIMEOUT, json={
        "temperature": 0, "max_tokens": 4,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Hello"}]}).json()
    assert turns[1]["content"] == expected["choices"][0]["message"]["content"]
    assert f"{expected['usage']['completion_tokens']} tokens" in \
        browser.find_element(By.ID, "stats").text
