"""The chat page at / in a real headless Chromium: type a message, see the streamed reply.

Needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`)
and selenium (dev extra); skipped when the browser is absent. Set OFFLOAD_CHAT_SCREENSHOT
to a .png path to keep a screenshot of the page with its reply.
"""

from __future__ import annotations

import os
import shutil

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


def test_page_streams_a_reply_and_shows_its_stats(qwen2_q, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with load(qwen2_q, device="cpu", progress=False) as engine, \
            LiveServer(engine, ServerConfig(max_batch=2)) as live:
        browser.get(live.url + "/")
        wait = WebDriverWait(browser, TIMEOUT)
        wait.until(lambda d: live.service.model_id in d.find_element(By.ID, "model").text)
        for field, value in (("temperature", "0"), ("max-tokens", "12")):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        browser.find_element(By.ID, "system").clear()
        browser.find_element(By.ID, "system").send_keys("Be brief.")
        browser.find_element(By.ID, "prompt").send_keys("What is a list?")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: "none yet" not in d.find_element(By.ID, "stats").text)
        shown = browser.find_element(By.CSS_SELECTOR, ".msg.assistant").text
        stats = browser.find_element(By.ID, "stats").text
        if os.environ.get("OFFLOAD_CHAT_SCREENSHOT"):
            browser.save_screenshot(os.environ["OFFLOAD_CHAT_SCREENSHOT"])
        expected = httpx.post(f"{live.url}/v1/chat/completions", timeout=TIMEOUT, json={
            "model": live.service.model_id, "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "What is a list?"}]}).json()
    reply = expected["choices"][0]["message"]["content"]
    # the DOM's text normalises whitespace (\r becomes \n, edges are trimmed): compare words
    assert shown.split() == reply.split() and shown.strip()
    assert f"{expected['usage']['completion_tokens']} tokens" in stats
    assert "MiB/token" in stats and "first token" in stats
