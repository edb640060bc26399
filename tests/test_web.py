"""The web page in a real browser: Debian's chromium, headless, driven by Selenium through the
system chromedriver, against a real ``serve`` process on loopback (the fake backend, 50 ms a
word, so a reply can be stopped or the page reloaded in the middle of it).

On failure a screenshot and the page's HTML are saved under $CS_TEST_ARTIFACTS (default: the
temp folder's ``conversation-session-artifacts/web``).  With $CS_WEB_SCREENSHOT set to a path,
``test_main_view`` also writes its screenshot there (docs/screenshot.png is made that way).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver  # the dev extras; never skipped: the page is tested or the run fails
from selenium.common.exceptions import NoAlertPresentException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from test_service import TOKEN_A, ServiceProcess, auth, service

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.fail("the browser tests need Debian's chromium and chromium-driver (./scripts/test installs them)",
                pytrace=False)

WORDS = " ".join(f"w{i}" for i in range(60))  # a reply of ~62 pieces: about 3 s at 50 ms a piece
TOKEN_KEY = "conversation-session.token"
ARTIFACTS = Path(os.environ.get("CS_TEST_ARTIFACTS") or Path(tempfile.gettempdir()) / "conversation-session-artifacts")


# A server-side tool slow enough to be seen running in the page (a call shows before its result).
TOOLS = '''
import time


def open_blinds(room: str) -> str:
    """Open a room's blinds."""
    time.sleep(3.0)  # long enough for the page to be seen showing the call before its result
    return f"<b>{room}</b> blinds open"
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    base = tmp_path_factory.mktemp("web")
    tools = base / "house.py"
    tools.write_text(TOOLS)
    with service(base / "sessions", "--token", TOKEN_A, "--fake-delay", "0.05", "--rate", "1000",
                 "--burst", "1000", "--tools-file", str(tools)) as proc:
        yield proc


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,820", "--lang=en-US", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: WebDriver, server: ServiceProcess, request: pytest.FixtureRequest) -> Iterator[WebDriver]:
    """The page, opened with the token already kept in the browser (as after the prompt)."""
    browser.set_window_size(1200, 820)
    browser.get(server.url + "/")
    browser.execute_script("localStorage.setItem(arguments[0], arguments[1])", TOKEN_KEY, TOKEN_A)
    browser.get(server.url + "/")
    wait(browser, lambda d: d.find_element(By.ID, "token-panel").get_attribute("hidden") is not None,
         "the page to start")
    yield browser
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        folder = ARTIFACTS / "web"
        folder.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^\w.-]", "_", request.node.name)
        with contextlib.suppress(WebDriverException):
            browser.save_screenshot(str(folder / f"{name}.png"))
            (folder / f"{name}.html").write_text(browser.page_source)
            print(f"screenshot and page saved in {folder}")
    with contextlib.suppress(NoAlertPresentException):
        browser.switch_to.alert.dismiss()


@pytest.fixture
def api(server: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=auth(TOKEN_A), timeout=30) as client:
        yield client


# -- helpers -------------------------------------------------------------------------------------------
def wait(driver: WebDriver, cond: Callable[[WebDriver], Any], what: str, timeout: float = 20.0) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(cond, f"timed out waiting for {what}")


def by_id(driver: WebDriver, name: str) -> WebElement:
    return driver.find_element(By.ID, name)


def messages(driver: WebDriver) -> list[tuple[str, str]]:
    """(role, text as shown) of each message on the page."""
    rows = driver.execute_script("""
        return [...document.querySelectorAll('#messages .msg')].map(m =>
          [m.classList.contains('user') ? 'user' : 'assistant', m.querySelector('.body').textContent]);""")
    return [(str(role), str(text)) for role, text in rows]


def current_sid(driver: WebDriver) -> str:
    sid = str(driver.execute_script("return decodeURIComponent(location.hash.slice(1))"))
    assert sid, "no session open"
    return sid


def new_session(driver: WebDriver) -> str:
    before = driver.execute_script("return location.hash")
    by_id(driver, "new-session").click()
    wait(driver, lambda d: d.execute_script("return location.hash") not in ("", "#", before), "a new session")
    return current_sid(driver)


def type_and_send(driver: WebDriver, *lines: str) -> None:
    """Type ``lines`` (Shift+Enter between them) and press Enter."""
    box = by_id(driver, "input")
    box.click()
    for i, line in enumerate(lines):
        if i:
            box.send_keys(Keys.SHIFT, Keys.ENTER)
        box.send_keys(line)
    box.send_keys(Keys.ENTER)


def streaming_text(driver: WebDriver) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, "#messages .msg.streaming .body")
    return (found[0].get_attribute("textContent") or "") if found else ""


def reply_done(ending: str) -> Callable[[WebDriver], bool]:
    """The page shows a finished last reply ending with ``ending``."""
    def check(driver: WebDriver) -> bool:
        if driver.find_elements(By.CSS_SELECTOR, "#messages .msg.streaming"):
            return False
        shown = messages(driver)
        return bool(shown) and shown[-1][0] == "assistant" and shown[-1][1].rstrip().endswith(ending)
    return check


def replies_done(count: int) -> Callable[[WebDriver], bool]:
    """The page shows ``count`` messages, the last a finished reply."""
    def check(driver: WebDriver) -> bool:
        shown = messages(driver)
        return (not driver.find_elements(By.CSS_SELECTOR, "#messages .msg.streaming") and len(shown) == count
                and shown[-1][0] == "assistant")
    return check


def saved(api: httpx.Client, sid: str) -> list[dict[str, Any]]:
    resp = api.get(f"/v1/sessions/{sid}")
    assert resp.status_code == 200, resp.text
    return list(resp.json()["history"])


# -- the tests -------------------------------------------------------------------------------------------
def test_token_prompt_and_wrong_token(browser: WebDriver, server: ServiceProcess, request: pytest.FixtureRequest
                                      ) -> None:
    browser.get(server.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(server.url + "/")
    panel = by_id(browser, "token-panel")
    wait(browser, lambda d: panel.is_displayed(), "the token form")
    assert "needs an access token" in by_id(browser, "token-message").text
    by_id(browser, "token-input").send_keys("not-the-token", Keys.ENTER)
    wait(browser, lambda d: "not accepted" in by_id(d, "token-message").text, "the wrong-token message")
    assert panel.is_displayed()
    by_id(browser, "token-input").send_keys(TOKEN_A, Keys.ENTER)
    wait(browser, lambda d: not panel.is_displayed(), "the form to close")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#session-list li"), "the session list")
    assert browser.execute_script("return localStorage.getItem(arguments[0])", TOKEN_KEY) == TOKEN_A
    assert "token" not in browser.current_url


def test_send_streams_the_reply_and_keyboard(page: WebDriver, api: httpx.Client) -> None:
    sid = new_session(page)
    type_and_send(page, "first line", WORDS)  # Shift+Enter made a second line; Enter sent
    partial = wait(page, lambda d: streaming_text(d).strip(), "the reply to start streaming")
    wait(page, reply_done(WORDS), "the reply to finish")
    shown = messages(page)
    assert shown[-2] == ("user", "first line\n" + WORDS)
    final = shown[-1][1]
    assert final.startswith(partial.strip()) and len(partial.strip()) < len(final), (partial, final)
    assert by_id(page, "input").get_attribute("value") == ""
    history = saved(api, sid)
    assert history[-1]["role"] == "assistant" and history[-1]["content"].endswith(WORDS)
    # The list shows it, newest first, with its turn count.
    first = page.find_element(By.CSS_SELECTOR, "#session-list li button")
    assert first.get_attribute("data-sid") == sid and "1 turn" in first.text


def test_reload_mid_reply_finds_it_complete(page: WebDriver, api: httpx.Client) -> None:
    sid = new_session(page)
    type_and_send(page, WORDS)
    wait(page, lambda d: "w3 " in streaming_text(d), "a few words of the reply")
    page.refresh()  # the tab goes away mid-reply...
    wait(page, reply_done(WORDS), "the reply, complete after the reload")
    assert current_sid(page) == sid
    last = saved(api, sid)[-1]
    assert last["content"].endswith(WORDS) and not last.get("interrupted")  # ...and the reply was kept whole
    assert [r for r, _ in messages(page)] == ["user", "assistant"]  # shown once, not twice


def test_stop_button_and_escape(page: WebDriver, api: httpx.Client) -> None:
    sid = new_session(page)
    type_and_send(page, WORDS)
    wait(page, lambda d: "w2 " in streaming_text(d), "the reply to stream")
    assert by_id(page, "stop").is_enabled()
    by_id(page, "stop").click()
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .badge"), "the interrupted mark")
    last = saved(api, sid)[-1]
    assert last["interrupted"] is True and not last["content"].endswith(WORDS)
    assert messages(page)[-1][1].strip() == last["content"].strip()

    type_and_send(page, WORDS)
    wait(page, lambda d: "w2 " in streaming_text(d), "the second reply to stream")
    by_id(page, "input").send_keys(Keys.ESCAPE)
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant .badge")) == 2, "the second stop")
    history = saved(api, sid)
    assert len(history) == 4 and history[-1]["interrupted"] is True


def test_undo_and_retry(page: WebDriver, api: httpx.Client) -> None:
    sid = new_session(page)
    type_and_send(page, "alpha one")
    wait(page, reply_done("alpha one"), "the first reply")
    type_and_send(page, "beta two")
    wait(page, reply_done("beta two"), "the second reply")
    by_id(page, "undo").click()
    wait(page, lambda d: len(messages(d)) == 2, "the last turn to go")
    assert [m["content"] for m in saved(api, sid)][:1] == ["alpha one"] and len(saved(api, sid)) == 2
    before = messages(page)[-1][1]
    by_id(page, "retry").click()
    wait(page, lambda d: reply_done("alpha one")(d) and messages(d)[-1][1] != before, "the new reply")
    history = saved(api, sid)
    assert len(history) == 2 and history[-1]["content"].strip() == messages(page)[-1][1].strip() != before.strip()


def test_rename_search_and_delete(page: WebDriver, api: httpx.Client) -> None:
    sid = new_session(page)
    type_and_send(page, "we need kiwifruit-7 and bread")
    wait(page, reply_done("bread"), "the reply")
    by_id(page, "rename").click()
    title_box = by_id(page, "rename-input")
    title_box.clear()
    title_box.send_keys("Groceries <b>list</b>", Keys.ENTER)
    wait(page, lambda d: by_id(d, "session-title").text == "Groceries <b>list</b>", "the new title")
    wait(page, lambda d: "Groceries <b>list</b>" in d.find_element(By.ID, "session-list").text, "the title listed")
    assert api.get(f"/v1/sessions/{sid}").json()["title"] == "Groceries <b>list</b>"

    new_session(page)  # somewhere else, then find it again by searching
    by_id(page, "search").send_keys("KIWIFRUIT-7")
    hit = wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, f'#search-results button[data-sid="{sid}"]'),
               "a search hit")[0]
    assert "kiwifruit-7" in hit.text
    hit.click()
    wait(page, lambda d: current_sid(d) == sid and "kiwifruit-7" in messages(d)[0][1], "the found session")
    by_id(page, "search").clear()
    by_id(page, "search").send_keys(" ")

    by_id(page, "delete").click()
    alert = wait(page, lambda d: d.switch_to.alert, "the confirmation")
    assert "Groceries <b>list</b>" in alert.text
    alert.dismiss()  # no: nothing happens
    assert api.get(f"/v1/sessions/{sid}").status_code == 200
    by_id(page, "delete").click()
    wait(page, lambda d: d.switch_to.alert, "the confirmation").accept()
    wait(page, lambda d: not d.find_elements(By.CSS_SELECTOR, f'#session-list button[data-sid="{sid}"]'),
         "the session to leave the list")
    assert api.get(f"/v1/sessions/{sid}").status_code == 404


def test_export_downloads(page: WebDriver, api: httpx.Client, downloads: Path) -> None:
    sid = new_session(page)
    type_and_send(page, "export me please")
    wait(page, reply_done("export me please"), "the reply")
    by_id(page, "export-json").click()
    by_id(page, "export-md").click()
    files = [downloads / f"{sid}.json", downloads / f"{sid}.md"]
    wait(page, lambda d: all(f.exists() and f.stat().st_size > 0 for f in files), "both downloads")
    data = json.loads(files[0].read_text())
    assert data["conversation_history"][0]["content"] == "export me please"
    text = files[1].read_text()
    assert "## user" in text and "export me please" in text and "## assistant" in text


def test_content_is_rendered_as_text(page: WebDriver, api: httpx.Client) -> None:
    new_session(page)
    attack = '<img src=x onerror="document.title=\'pwned\'"> <script>document.title=\'pwned2\'</script>'
    type_and_send(page, "Look: **bold** and `<i>code</i>`", attack, "```", "<b>not bold</b>", "```")
    wait(page, replies_done(2), "the reply")
    for tag in ("img", "script", "i", "b"):
        assert not page.find_elements(By.CSS_SELECTOR, f"#messages {tag}"), tag  # nothing became markup
    assert page.title == "Conversations"
    with pytest.raises(NoAlertPresentException):
        page.switch_to.alert.text  # noqa: B018 - raises when no script ran
    user = messages(page)[0][1]
    assert attack in user and "**bold**" in user  # the user's own words, verbatim
    reply = page.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant .body")[-1]
    assert reply.find_element(By.CSS_SELECTOR, "strong").text == "bold"  # the model's Markdown, rendered...
    assert reply.find_element(By.CSS_SELECTOR, "p code").text == "<i>code</i>"
    assert reply.find_element(By.CSS_SELECTOR, "pre code").get_attribute("textContent") == "<b>not bold</b>"
    assert attack in (reply.get_attribute("textContent") or "")  # ...and its HTML shown as text
    violations = [e for e in page.get_log("browser") if "Content Security Policy" in e.get("message", "")]
    assert not violations, violations  # the page keeps its own policy


def test_a_tool_call_shows_while_it_runs_then_its_result(page: WebDriver, api: httpx.Client) -> None:
    """The reply's calls appear in the streaming bubble as they happen (the turn is detached:
    its events come through the same stream a reloaded tab follows), as text."""
    sid = new_session(page)
    type_and_send(page, '!call open_blinds {"room": "<i>den</i>"}')

    def running_call(driver: WebDriver) -> str:
        found = driver.find_elements(By.CSS_SELECTOR, "#messages .msg.streaming ul.calls li")
        return (found[0].get_attribute("textContent") or "") if found else ""

    line = wait(page, running_call, "the call's line while it runs")
    assert line.startswith("🔧 open_blinds(") and "<i>den</i>" in line and "→" not in line
    wait(page, lambda d: "→ <b><i>den</i></b> blinds open" in running_call(d) or reply_done("blinds open.")(d),
         "the call's result")
    wait(page, reply_done("blinds open."), "the reply")
    assert not page.find_elements(By.CSS_SELECTOR, "#messages i, #messages b")  # the tool's text stayed text
    assert [m["role"] for m in saved(api, sid)] == ["user", "assistant", "tool", "assistant"]


def test_phone_size_and_labels(page: WebDriver) -> None:
    page.set_window_size(390, 844)
    try:
        sidebar = by_id(page, "sidebar")
        wait(page, lambda d: not sidebar.is_displayed(), "the list to fold away")
        for name in ("input", "send", "stop", "toggle-list"):
            box = by_id(page, name)
            assert box.is_displayed(), name
            right = page.execute_script("return arguments[0].getBoundingClientRect().right", box)
            assert right <= 390, (name, right)
        by_id(page, "toggle-list").click()
        wait(page, lambda d: sidebar.is_displayed(), "the list to open")
        assert by_id(page, "toggle-list").get_attribute("aria-expanded") == "true"
        unlabelled = page.execute_script("""
            return [...document.querySelectorAll('button, input, textarea, summary')]
              .filter(e => !(e.getAttribute('aria-label') || '').trim()).map(e => e.id || e.outerHTML);""")
        assert unlabelled == []
    finally:
        page.set_window_size(1200, 820)


def test_main_view(page: WebDriver, api: httpx.Client) -> None:
    """The main view with a few sessions; its screenshot goes to $CS_WEB_SCREENSHOT when set."""
    for text in ("Which sourdough starter ratio?", "Plan a walk along the coast"):
        sid = api.post("/v1/sessions", json={}).json()["session_id"]
        assert api.post(f"/v1/sessions/{sid}/messages", json={"text": text}).status_code == 200
    api.patch(f"/v1/sessions/{sid}", json={"title": "Coast walk"})
    sid = new_session(page)
    type_and_send(page, "Packing list for the coast, please.", "", "- rain jacket", "- **good** boots",
                  "", "```bash", "rsync -a photos/ backup/", "```")
    wait(page, replies_done(2), "the reply")
    api.patch(f"/v1/sessions/{sid}", json={"title": "Packing list"})
    page.refresh()
    wait(page, lambda d: by_id(d, "session-title").text == "Packing list", "the title")
    assert page.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant ul li strong")
    assert len(page.find_elements(By.CSS_SELECTOR, "#session-list li button")) >= 3
    target = os.environ.get("CS_WEB_SCREENSHOT")
    if target:
        time.sleep(0.3)  # let the last frame paint
        assert page.save_screenshot(target)


# -- voice (serve --tts) -------------------------------------------------------------------------------------
SENTENCES = " ".join(f"Sentence number {n} is spoken here." for n in range(1, 13))


@pytest.fixture(scope="module")
def tts_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    if not shutil.which("espeak-ng"):
        pytest.fail("the voice test needs espeak-ng (./scripts/test installs it)", pytrace=False)
    base = tmp_path_factory.mktemp("web-tts")
    with service(base / "sessions", "--token", TOKEN_A, "--fake-delay", "0.05", "--rate", "1000",
                 "--burst", "1000", "--tts") as proc:
        yield proc


def open_voice_page(browser: WebDriver, server: ServiceProcess) -> None:
    browser.get(server.url + "/")
    browser.execute_script("localStorage.setItem(arguments[0], arguments[1])", TOKEN_KEY, TOKEN_A)
    browser.get(server.url + "/")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#session-list li"), "the page to start")
    new_session(browser)
    by_id(browser, "voice").click()


@pytest.mark.parametrize("when", ["while_written", "after_saved"])
def test_barge_in_keeps_what_was_heard(browser: WebDriver, tts_server: ServiceProcess, when: str,
                                       request: pytest.FixtureRequest) -> None:
    """Replies spoken sentence by sentence; typing while it speaks stops the audio at once and
    the saved reply is cut to what was played, marked interrupted."""
    browser.set_window_size(1200, 820)
    open_voice_page(browser, tts_server)
    sid = current_sid(browser)
    try:
        type_and_send(browser, SENTENCES)
        if when == "after_saved":
            wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, "#messages .msg.streaming")
                 and d.execute_script("return voice.done !== null"), "the reply to be saved", timeout=30)
        wait(browser, lambda d: d.execute_script("return heardMs()") > 1500, "some of the reply to be heard",
             timeout=30)
        assert browser.execute_script("return speaking()")
        if when == "while_written":
            assert browser.find_elements(By.CSS_SELECTOR, "#messages .msg.streaming")
        by_id(browser, "input").send_keys("w")  # starting to type is a barge-in
        assert not browser.execute_script("return speaking()")  # playback stopped at once
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .badge"), "the interrupted mark",
             timeout=30)
        with httpx.Client(base_url=tts_server.url, headers=auth(TOKEN_A), timeout=30) as api:
            last = saved(api, sid)[-1]
        assert last["role"] == "assistant" and last["interrupted"] is True
        kept = re.sub(r"^Reply \d+: ", "", last["content"])  # the fake's reply: "Reply N: " and the message
        assert kept and SENTENCES.startswith(kept.rstrip()) and len(kept) < len(SENTENCES), last["content"]
        if when == "after_saved":  # the page said which sentences it played: whole ones are kept
            assert kept.rstrip().endswith("."), kept
        assert messages(browser)[-1][1].strip() == last["content"].strip()
    except BaseException:
        folder = ARTIFACTS / "web"
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(WebDriverException):
            browser.save_screenshot(str(folder / f"{request.node.name}.png"))
        raise
    finally:
        browser.execute_script("closeVoice()")


def test_tool_calls_are_shown_as_text(browser: WebDriver, tmp_path: Path) -> None:
    """A session whose model called a server-side tool: the page shows the call (🔧 name(args))
    and its result (name → result) as text, whatever markup they hold."""
    tools = tmp_path / "house.py"
    tools.write_text('def set_light(room: str) -> str:\n    """Switch a light on."""\n'
                     '    return "<img src=x onerror=\\"document.title=\'pwned\'\\"> on in " + room\n')
    with service(tmp_path / "sessions", "--token", TOKEN_A, "--tools-file", str(tools)) as proc:
        with httpx.Client(base_url=proc.url, headers=auth(TOKEN_A), timeout=30) as client:
            sid = client.post("/v1/sessions").json()["session_id"]
            body = client.post(f"/v1/sessions/{sid}/messages",
                               json={"text": '!call set_light {"room": "<b>hall</b>"}'}).json()
            assert [c["name"] for c in body["tool_calls"]] == ["set_light"]
        browser.get(proc.url + "/")
        browser.execute_script("localStorage.setItem(arguments[0], arguments[1])", TOKEN_KEY, TOKEN_A)
        browser.get(proc.url + f"/#{sid}")
        browser.refresh()  # a new fragment alone is not a new page: load it, as a bookmark would
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .msg.tool"), "the tool result")
        call = browser.find_element(By.CSS_SELECTOR, "#messages .calls li").text
        assert call.startswith("🔧 set_light(") and "<b>hall</b>" in call
        result = browser.find_element(By.CSS_SELECTOR, "#messages .msg.tool .body").text
        assert result.startswith("set_light → <img src=x") and result.endswith("on in <b>hall</b>")
        for tag in ("img", "b"):
            assert not browser.find_elements(By.CSS_SELECTOR, f"#messages {tag}"), tag
        assert browser.title == "Conversations"
