"""The web playground in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium)
against a real server with the `tiny-random` model and keys on. The page loads with no console error (a CSP
violation would be one), builds its parameter form from the OpenAPI schema, and says in words what a missing key
(401) and a key without credits (406) mean. With a key typed in, it generates with the built-in voice (sync
route), with an uploaded WAV clip (queued route: submit, poll, fetch `output`), with that clip saved as a library
voice (where the server has GET /v1/audio/voices), and with a clip recorded from Chromium's fake microphone
(converted to WAV in the page) as raw pcm (played behind a WAV header). Each time the <audio> element gets
playable audio, the waveform is drawn and the clip joins the history with a download link. A phone viewport
(375 px) has no horizontal scroll. Those paths run with "Stream" unticked; a second test, against the fake engine
streaming one piece per sentence, has the page play the audio as it streams (Web Audio), draw the waveform as it
grows, report a time to first audio well under the total, and end with the whole clip (wav and pcm), and says a
stream cut by a late failure in words. Screenshots are written to $CHATTERBOX_ARTIFACTS (else the test's tmp dir)
and their paths printed.

The test installs Chromium and its driver with apt-get when they are missing (CI on a fresh machine runs it), and
skips, saying why, only where that is impossible (not root, no apt-get, or the install fails).
"""
from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from chatterbox_serverless.api.schemas import TTSRequest
from chatterbox_serverless.testing import start_server

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a test extra: pip install -e '.[test]'")
pipeline = pytest.importorskip("chatterbox_serverless.engine.pipeline")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

GENERATE_TIMEOUT = 180
WIDER_THAN_375 = """return [...document.querySelectorAll('body *')].map(e => [e, e.getBoundingClientRect()])
    .filter(([e, r]) => r.right > 375.5).map(([e, r]) => `${e.tagName}#${e.id}.${e.className} ${r.left}-${r.right}`)"""


def chromium() -> tuple[str, str]:
    """Paths of the chromium binary and its driver, installed from Debian's packages when missing."""
    def found():
        return shutil.which("chromium"), shutil.which("chromedriver")

    browser, driver = found()
    if browser and driver:
        return browser, driver
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("Chromium is not installed and cannot be installed here (needs root and apt-get): "
                    "apt-get install chromium chromium-driver")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for cmd in (["apt-get", *lock, "update", "-q"],
                ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver",
                 "fonts-liberation"]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip(f"installing Chromium timed out ({' '.join(cmd)})")
        if done.returncode != 0:
            pytest.skip(f"Chromium could not be installed ({' '.join(cmd)} exited {done.returncode}): "
                        f"{(done.stderr or done.stdout)[-500:]}")
    browser, driver = found()
    if not (browser and driver):
        pytest.skip("apt-get installed chromium and chromium-driver but they are not on PATH")
    return browser, driver


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = os.environ.get("CHATTERBOX_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch
    torch.set_num_threads(1)
    data = tmp_path_factory.mktemp("playground")
    engine = pipeline.load_engine("tiny-random", data_dir=data, device="cpu")
    with start_server(data, engine=engine, accounts=True, batch_wait=0.02) as srv:
        key, _ = srv.accounts.create_key("playground test", credits=100_000, rate_per_min=0)
        srv.extra["key"] = key
        yield srv


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = chromium()
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--mute-audio",
                "--window-size=1280,1000", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                "--autoplay-policy=no-user-gesture-required", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-sync", "--disable-component-update"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_state(driver, *states: str, timeout: float = GENERATE_TIMEOUT) -> str:
    WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: d.execute_script("return document.body.dataset.state") in states)
    return driver.execute_script("return document.body.dataset.state")


def error_text(driver) -> str:
    return driver.execute_script("const e = document.getElementById('error'); return e.hidden ? '' : e.textContent")


def generate(driver) -> dict:
    """Click Generate, wait for the result, and return what the <audio> element and the page show."""
    driver.find_element(By.ID, "generate").click()     # its handler marks the page "busy" before it returns
    return finished(driver)


def finished(driver) -> dict:
    """Wait for the generation in progress to end well; what the <audio> element and the page show."""
    state = wait_state(driver, "done", "error")
    assert state == "done", error_text(driver)
    # the player has playable audio: metadata loaded (readyState >= 1) and a positive duration
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "const p = document.getElementById('player'); return p.readyState >= 1 && p.duration > 0"))
    return driver.execute_script("""
        const p = document.getElementById('player');
        const stats = {};
        for (const div of document.querySelectorAll('#stats > div'))
            stats[div.querySelector('dt').textContent] = div.querySelector('dd').textContent;
        const metrics = {};
        for (const div of document.querySelectorAll('#metrics > div'))
            metrics[div.querySelector('dt').textContent] = div.querySelector('dd').textContent;
        const c = document.getElementById('waveform');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let painted = 0;
        for (let i = 3; i < px.length; i += 4) if (px[i] > 0) painted++;
        const links = [...document.querySelectorAll('#history a[download]')].map(a => [a.href, a.download]);
        return {src: p.currentSrc, readyState: p.readyState, duration: p.duration, stats, metrics,
                painted, history: links};
    """)


def request_params(server, shown: dict) -> dict:
    job = server.store.get(shown["stats"]["Request id"])
    assert job is not None, shown
    return job.params


def reference_wav(path: Path) -> Path:
    rate = 16000
    t = np.arange(2 * rate) / rate
    voice = 0.3 * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    sf.write(path, voice.astype(np.float32), rate, subtype="PCM_16")
    return path


def test_playground_generates_with_a_key_an_uploaded_clip_and_a_recording(server, browser, artifacts, tmp_path):
    started = time.monotonic()
    driver = browser
    driver.get(server.url + "/")
    assert wait_state(driver, "idle", "error", timeout=30) == "idle", error_text(driver)

    # the parameter form is the schema's: every parameter but the text and the voice, with its default and range
    fields = {name: spec for name, spec in TTSRequest.model_json_schema()["properties"].items()
              if name not in ("text", "reference_audio", "voice", "stream")}   # the voice and stream: own controls
    for name, spec in fields.items():
        element = driver.find_element(By.ID, f"param-{name}")
        value = element.get_attribute("value")
        if "enum" in spec:
            assert Select(element).first_selected_option.text == spec["default"], name
        elif spec.get("type") == "boolean":                 # a box (e.g. stream)
            assert element.get_attribute("type") == "checkbox" and element.is_selected() == spec["default"], name
        else:
            assert float(value) == spec["default"], (name, value)
        if "maximum" in spec and spec["maximum"] - spec["minimum"] <= 1e6:
            assert float(element.get_attribute("max")) == spec["maximum"], name
    assert Select(driver.find_element(By.ID, "model")).first_selected_option.text == "chatterbox-tts"
    # /v1 takes "stream": the Stream box is offered, ticked; this test takes the unstreamed paths (see the next)
    assert not driver.find_elements(By.ID, "param-stream")
    stream_box = driver.find_element(By.ID, "stream")
    assert stream_box.is_displayed() and stream_box.is_selected()
    stream_box.click()
    assert not stream_box.is_selected()
    # the voice library's choice is offered once a key may list it (hidden while GET /v1/audio/voices is 401/404)
    assert not driver.find_element(By.ID, "voice-library-choice").is_displayed()

    # without a key: the 401 in words
    text = driver.find_element(By.ID, "text")
    text.clear()
    text.send_keys("Hello from the playground.")
    driver.find_element(By.ID, "generate").click()
    assert wait_state(driver, "error", timeout=30) == "error"
    message = error_text(driver)
    assert "needs a valid API key" in message and "missing API key" in message, message

    # a key without credits: the 406 in words
    broke, _ = server.accounts.create_key("no credits", credits=0, rate_per_min=0)
    key_input = driver.find_element(By.ID, "api-key")
    key_input.send_keys(broke)
    WebDriverWait(driver, 10).until(
        lambda d: '"no credits": 0 credits available' in d.find_element(By.ID, "account").text)
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 30).until(lambda d: "Not enough credits" in error_text(d))
    key_input.clear()

    # with the key: the built-in voice, the short text takes the sync route
    key_input.send_keys(server.extra["key"])
    WebDriverWait(driver, 10).until(lambda d: '"playground test": ' in d.find_element(By.ID, "account").text)
    assert driver.execute_script("return sessionStorage.getItem('chatterbox-playground.api-key')") == \
        server.extra["key"]
    first = generate(driver)
    assert first["src"].startswith("blob:") and first["duration"] > 0
    assert first["stats"]["Route"] == "sync /v1/chatterbox-tts"
    assert first["stats"]["Real-time factor"].endswith("× real time")
    assert first["stats"]["Time to first audio"].endswith(" s")
    assert "inference_time" in first["metrics"], first["metrics"]
    assert first["painted"] > 100, "the waveform is drawn"
    assert len(first["history"]) == 1 and first["history"][0][1].endswith(".mp3")
    assert request_params(server, first).get("reference_audio") is None

    # an uploaded clip (2 s of 16 kHz WAV), through the queued route
    clip = reference_wav(tmp_path / "my voice.wav")
    driver.find_element(By.CSS_SELECTOR, "input[name=voice][value=clip]").click()
    driver.find_element(By.ID, "clip-file").send_keys(str(clip))
    WebDriverWait(driver, 20).until(lambda d: "2.0 s" in d.find_element(By.ID, "clip-info").text)
    Select(driver.find_element(By.ID, "route")).select_by_value("v2")
    second = generate(driver)
    assert second["stats"]["Route"] == "queued /v2/chatterbox-tts" and second["duration"] > 0
    assert second["stats"]["Voice"] == "my voice.wav"
    assert len(second["history"]) == 2

    # where the server has a voice library, the uploaded clip becomes a library voice and speaks
    library = httpx.get(server.url + "/v1/audio/voices", headers={"x-api-key": server.extra["key"]}, timeout=10)
    assert library.status_code in (200, 404), library.text
    assert driver.find_element(By.ID, "voice-library-choice").is_displayed() == (library.status_code == 200)
    if library.status_code == 200:
        driver.find_element(By.ID, "save-voice-name").send_keys("test voice")
        driver.find_element(By.ID, "save-voice-button").click()
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return document.querySelector('input[name=voice][value=library]').checked") or error_text(d))
        assert error_text(driver) == ""
        [voice] = httpx.get(server.url + "/v1/audio/voices", headers={"x-api-key": server.extra["key"]},
                            timeout=10).json()["data"]
        assert voice["name"] == "test voice"
        assert Select(driver.find_element(By.ID, "library-voice")).first_selected_option.get_attribute("value") \
            == voice["id"]
        from_library = generate(driver)
        assert from_library["duration"] > 0 and from_library["stats"]["Voice"].startswith("test voice")
        assert request_params(server, from_library)["voice"] in (voice["id"], voice["name"])
        driver.find_element(By.CSS_SELECTOR, "input[name=voice][value=clip]").click()
    sent = request_params(server, second)["reference_audio"]
    assert sent == "data:audio/wav;base64," + base64.b64encode(clip.read_bytes()).decode(), "the file as it is"

    # a recording from the (fake) microphone, converted to WAV in the page
    driver.find_element(By.ID, "record").click()
    WebDriverWait(driver, 10).until(lambda d: "recording" in d.find_element(By.ID, "record-status").text)
    time.sleep(1.5)
    driver.find_element(By.ID, "record").click()
    WebDriverWait(driver, 20).until(lambda d: "recording.wav (converted to WAV)" in
                                    d.find_element(By.ID, "clip-info").text)
    # ... and raw pcm out, which the page plays behind a WAV header and offers for download as it came
    Select(driver.find_element(By.ID, "param-output_format")).select_by_visible_text("pcm")
    third = generate(driver)
    assert third["duration"] > 0 and third["history"][0][1].endswith(".pcm")
    sent = request_params(server, third)["reference_audio"]
    assert sent.startswith("data:audio/wav;base64,")
    recorded, rate = sf.read(io.BytesIO(base64.b64decode(sent.split(",", 1)[1])))
    assert rate == 24000 and 1.0 < len(recorded) / rate < 3.0
    assert len(third["history"]) == 3 + (library.status_code == 200)

    # nothing went wrong in the page: no console error (CSP violations and failed loads are errors) beyond the
    # answers it was meant to get: the 401 without a key, the 406 without credits, the 404 of an absent library
    expected = ("status of 401", "status of 406",
                "/v1/audio/voices - Failed to load resource: the server responded with a status of 404")
    logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
            and not (e["source"] == "network" and any(x in e["message"] for x in expected))]
    assert logs == [], logs

    desktop = artifacts / "playground-desktop.png"
    driver.set_window_size(1280, 1000)
    page_height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, page_height + 1000 - driver.execute_script("return window.innerHeight"))
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(desktop))

    # a phone: 375 px wide, no horizontal scroll
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 375, "height": 812, "deviceScaleFactor": 2, "mobile": True})
    driver.execute_script("window.scrollTo(0, 0); window.dispatchEvent(new Event('resize'))")
    time.sleep(0.3)
    widths = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1] == 375, (widths, driver.execute_script(WIDER_THAN_375))
    phone = artifacts / "playground-phone.png"
    driver.save_screenshot(str(phone))
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 375, "height": height, "deviceScaleFactor": 1, "mobile": True})
    phone_full = artifacts / "playground-phone-full.png"
    driver.save_screenshot(str(phone_full))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    print(f"\nplayground screenshots: {desktop} {phone} {phone_full} "
          f"(browser test {time.monotonic() - started:.1f} s)")


@pytest.fixture(scope="module")
def streaming_server(tmp_path_factory):
    """No keys; the fake engine streams one piece per sentence, 0.8 s apart."""
    from chatterbox_serverless.testing import FakeEngineForTests
    engine = FakeEngineForTests(piece_delay=0.8, seconds_per_char=0.03, max_seconds=10.0)
    with start_server(tmp_path_factory.mktemp("playground-stream"), engine=engine, batch_wait=0.02) as srv:
        yield srv


def seconds_of(stat: str) -> float:
    assert stat.endswith(" s"), stat
    return float(stat[:-2])


def downloaded(driver, folder: Path, n_before: int) -> Path:
    """Click the newest clip's download link; the file Chromium saved in `folder`."""
    driver.find_element(By.CSS_SELECTOR, "#history li:first-child a[download]").click()
    WebDriverWait(driver, 20).until(lambda d: len([p for p in folder.iterdir() if not p.name.endswith(
        ".crdownload")]) > n_before)
    return max(folder.iterdir(), key=lambda p: p.stat().st_mtime)


def test_playground_plays_the_audio_as_it_streams(streaming_server, browser, artifacts, tmp_path):
    """With Stream ticked (the default where /v1 takes it), the page asks /v1 for {"stream": true} as wav, plays
    each piece with the Web Audio API as it arrives (the first one while the rest is still being generated), draws
    the waveform as it grows, and reports a time to first audio well under the total time; the <audio> element and
    the download link end with the whole clip, sample for sample the file the server stored. pcm streams too; a
    stream the server cuts (the job fails after its first piece) is reported in words."""
    started = time.monotonic()
    server, driver = streaming_server, browser
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.get(server.url + "/")
    assert wait_state(driver, "idle", "error", timeout=30) == "idle", error_text(driver)
    assert driver.find_element(By.ID, "stream").is_selected()

    text = "The first sentence arrives early. Then the second one follows. And the third one ends it."
    expected_seconds = 0.1 + 0.03 * len(text)                 # the fake engine's tone: one piece per sentence
    box = driver.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "generate").click()
    # while the stream is still arriving: audio plays (the Web Audio context runs) and the waveform is drawn
    during = WebDriverWait(driver, 30, poll_frequency=0.05).until(lambda d: d.execute_script("""
        const r = document.getElementById('result');
        if (!(Number(r.dataset.streamPieces) > 0)) return null;
        const c = document.getElementById('waveform');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let painted = 0;
        for (let i = 3; i < px.length; i += 4) if (px[i] > 0) painted++;
        return {state: document.body.dataset.state, seconds: Number(r.dataset.streamSeconds), painted,
                context: r.dataset.streamContext, progress: document.getElementById('progress').textContent,
                src: document.getElementById('player').getAttribute('src')};"""))
    assert during["state"] == "busy", during
    assert 0 < during["seconds"] < expected_seconds - 0.5, during          # only the first piece(s) so far
    assert during["painted"] > 100 and during["context"] == "running", during
    assert during["progress"].startswith("streaming…") and during["src"] is None, during
    streaming = artifacts / "playground-streaming.png"
    driver.execute_script("document.getElementById('result').scrollIntoView({block: 'center'})")
    driver.save_screenshot(str(streaming))

    shown = finished(driver)
    assert shown["stats"]["Route"] == "streamed /v1/chatterbox-tts", shown["stats"]
    first_audio, total = seconds_of(shown["stats"]["Time to first audio"]), seconds_of(shown["stats"]["Total time"])
    assert 0 < first_audio < total - 1.0, shown["stats"]       # two more pieces came 0.8 s apart after the first
    assert shown["stats"]["Real-time factor"].endswith("× real time")
    assert abs(shown["duration"] - expected_seconds) < 1e-3, shown["duration"]
    assert abs(seconds_of(shown["stats"]["Audio length"]) - expected_seconds) < 0.01
    assert shown["painted"] > 100 and shown["src"].startswith("blob:")
    assert shown["metrics"].get("stream_pieces") == "3", shown["metrics"]
    played = driver.execute_script("return {...document.getElementById('result').dataset}")
    assert int(played["streamPieces"]) >= 3 and played["streamContext"] == "running", played
    assert float(played["streamFirstPlay"]) < total - 1.0, played     # it started playing long before the end
    job = server.store.get(shown["stats"]["Request id"])
    assert job.params["stream"] is True and job.params["output_format"] == "wav", job.params
    assert len(shown["history"]) == 1 and shown["history"][0][1].endswith(".wav")
    clip = downloaded(driver, downloads, 0)
    stored = httpx.get(httpx.get(f"{server.url}/v2/requests/{job.id}", timeout=10).json()["output"], timeout=10)
    got, rate = sf.read(clip, dtype="int16")
    want, want_rate = sf.read(io.BytesIO(stored.content), dtype="int16")
    assert rate == want_rate == 24000 and np.array_equal(got, want), (len(got), len(want))
    time.sleep(0.3)                                            # the waveform follows the Web Audio playback
    desktop = artifacts / "playground-streamed.png"
    driver.execute_script("document.getElementById('result').scrollIntoView({block: 'center'})")
    driver.save_screenshot(str(desktop))

    # pcm streams too: the raw bytes are offered for download, the player gets them behind a WAV header
    Select(driver.find_element(By.ID, "param-output_format")).select_by_visible_text("pcm")
    pcm = generate(driver)
    assert pcm["stats"]["Route"] == "streamed /v1/chatterbox-tts" and pcm["history"][0][1].endswith(".pcm")
    assert abs(pcm["duration"] - expected_seconds) < 1e-3
    raw = downloaded(driver, downloads, 1).read_bytes()
    pcm_job = server.store.get(pcm["stats"]["Request id"])
    assert raw == httpx.get(httpx.get(f"{server.url}/v2/requests/{pcm_job.id}", timeout=10).json()["output"],
                            timeout=10).content, "the stored pcm, byte for byte"
    assert len(raw) == 2 * len(want)

    # a stream cut after its first piece: said in words, with the job's error
    box.clear()
    box.send_keys("This one starts well. FAIL-MID-STREAM then stops.")
    driver.find_element(By.ID, "generate").click()
    assert wait_state(driver, "error", timeout=60) == "error"
    message = error_text(driver)
    assert message.startswith("The audio stream stopped early, after ") and "the job failed: " in message, message
    assert "fake engine" in message, message

    # an unticked box: the unstreamed sync route again
    driver.find_element(By.ID, "stream").click()
    box.clear()
    box.send_keys(text)
    unstreamed = generate(driver)
    assert unstreamed["stats"]["Route"] == "sync /v1/chatterbox-tts" and unstreamed["history"][0][1].endswith(".pcm")

    # no console error beyond the expected answers: no keys on this server (404 of /v1/account, of an absent
    # library), the cut body, and the failed job's status (422) the page asked for its error
    expected = ("/v1/account - Failed to load resource: the server responded with a status of 404",
                "/v1/audio/voices - Failed to load resource: the server responded with a status of 404",
                "ERR_INCOMPLETE_CHUNKED_ENCODING", "/status - Failed to load resource: the server responded with a "
                "status of 422")
    logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
            and not (e["source"] == "network" and any(x in e["message"] for x in expected))]
    assert logs == [], logs
    print(f"\nplayground streaming screenshots: {streaming} {desktop} "
          f"(time to first audio {first_audio:.2f} s of {total:.2f} s; test {time.monotonic() - started:.1f} s)")
