"""The chat page at GET / in headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
three turns stream and render with the model's name, the system prompt and temperature fields reach the
API, the stop button cuts an answer mid-way and frees its row; a screenshot lands in the test's folder."""
from __future__ import annotations

import shutil
import time

import httpx
import pytest

from serve_helpers import running_server

pytestmark = pytest.mark.usefixtures("one_thread")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver = shutil.which("chromedriver")
    binary = next((b for b in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if b), None)
    if not driver or not binary:
        pytest.fail("the chat page test needs a headless Chromium: install Debian's chromium and chromium-driver "
                    "(`make test` does, as root: apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,1000", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def wait_for(predicate, timeout: float = 60.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_chat_page_three_turns_stop_and_screenshot(default_model_dir, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By

    with running_server(default_model_dir, "serve.max_concurrent=2") as (url, state):
        sched = state.scheduler
        bodies = []
        submit = sched.submit
        monkeypatch.setattr(sched, "submit", lambda seqs: (bodies.append(seqs[0]), submit(seqs))[1])
        page = browser()
        try:
            page.get(url + "/")
            assert page.find_element(By.ID, "model").text == "SmolLM2-135M-Instruct"
            assert "SmolLM2-135M-Instruct" in page.title
            page.find_element(By.ID, "system").send_keys("You are a helpful assistant. Answer briefly.")
            tokens = page.find_element(By.ID, "max-tokens")
            tokens.clear()
            tokens.send_keys("24")
            questions = ["What is the capital of France?", "And of Italy?", "Name one famous dish from there."]
            for turn, question in enumerate(questions, 1):
                box = page.find_element(By.ID, "input")
                box.send_keys(question)
                page.find_element(By.ID, "send").click()
                wait_for(lambda: len(page.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == turn, what="a bubble")
                answer = page.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
                wait_for(lambda: answer.get_attribute("data-state") != "streaming", what="the answer")
                assert answer.get_attribute("data-state") == "done"
                text = answer.text
                assert text.strip()
                seq = bodies[-1]
                assert text.removesuffix("(stopped at max tokens)").strip() == seq.text.strip()
            assert "Paris" in page.find_elements(By.CSS_SELECTOR, ".msg.assistant")[0].text
            # the third request carried the system prompt and the whole history
            prompt = state.tokenizer.decode(bodies[-1].prompt_ids)
            assert "Answer briefly." in prompt and "Paris" in prompt and questions[1] in prompt
            assert not bodies[-1].params.do_sample  # temperature field 0: greedy
            assert [m.text for m in page.find_elements(By.CSS_SELECTOR, ".msg.user")] == questions
            page.save_screenshot(str(tmp_path / "chat_page.png"))
            print(f"screenshot: {tmp_path / 'chat_page.png'}")

            # a long answer, stopped mid-way: partial text kept, the row freed
            tokens.clear()
            tokens.send_keys("400")
            page.find_element(By.ID, "input").send_keys("Write a long story about a llama.")
            page.find_element(By.ID, "send").click()
            answer = wait_for(lambda: (a := page.find_elements(By.CSS_SELECTOR, ".msg.assistant")) and len(a) == 4
                              and len(a[-1].text) > 20 and a[-1], what="some streamed text")
            page.find_element(By.ID, "stop").click()
            wait_for(lambda: answer.get_attribute("data-state") == "stopped", what="the stop")
            assert "(stopped)" in answer.text
            wait_for(lambda: not sched.running, 10, "the row to be freed")
            assert bodies[-1].cancelled and len(bodies[-1].tokens) < 400
            assert page.find_element(By.ID, "send").is_enabled()
            assert httpx.get(url + "/health").json()["running"] == 0
        finally:
            page.quit()
