"""A screenshot of the chat page at / with one streamed reply, in headless Chromium.

Serves MODEL on a free loopback port, types PROMPT into the page, waits for the reply and
its stats, saves OUT (a .png), and stops. Needs Debian's chromium + chromium-driver and
selenium (dev extra). The one in docs/serving.md:

    OMP_WAIT_POLICY=PASSIVE python tools/chat_screenshot.py \
        ~/.cache/offload-engine/smollm2-135m-instruct-int4-asym-g64 docs/chat_page.png \
        --device cpu --gpu-budget 100MiB --prompt "Name three primary colors."
"""

from __future__ import annotations

import argparse
import shutil

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from offload_engine.cli.options import add_engine_args, engine_config_from_args
from offload_engine.decode.api import load
from offload_engine.server.app import ServerConfig, create_app
from offload_engine.server.runner import BackgroundServer


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--window-size=1100,760"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a directory written by `offload-engine quantize`")
    parser.add_argument("out", help="the .png to write")
    parser.add_argument("--prompt", default="Name three primary colors.")
    parser.add_argument("--max-tokens", default="48")
    add_engine_args(parser)
    args = parser.parse_args(argv)
    with load(args.model, engine_config_from_args(args)) as engine, \
            BackgroundServer(create_app(engine, ServerConfig())) as server:
        driver = browser()
        try:
            driver.get(server.url + "/")
            wait = WebDriverWait(driver, 600)
            wait.until(lambda d: "model: ..." not in d.find_element(By.ID, "model").text)
            for field, value in (("temperature", "0"), ("max-tokens", args.max_tokens)):
                driver.find_element(By.ID, field).clear()
                driver.find_element(By.ID, field).send_keys(value)
            driver.find_element(By.ID, "prompt").send_keys(args.prompt)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: "none yet" not in d.find_element(By.ID, "stats").text)
            driver.save_screenshot(args.out)
            print(driver.find_element(By.ID, "stats").text)
        finally:
            driver.quit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
