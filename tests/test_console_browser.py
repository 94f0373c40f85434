"""The web console in a real browser: Debian's headless Chromium driven by Selenium, against the app
under `chalice local` (a subprocess, as `make run` starts it) on the test session's moto_server, the
Metrika sandbox and this module's amoCRM sandbox. One browser for the module; each test opens a page.

`make test` installs chromium and chromium-driver when missing (Makefile). On a failure the
screenshot goes to a temporary folder (`conftest.pytest_runtest_makereport` names it).
`CONSOLE_SCREENSHOT=docs/console-mapping.png` makes the mapping test write the README's picture."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from sandbox.local_stack import CHALICE_LOCAL, free_port, wait_http
from tests.conftest import ADMIN_TOKEN, METRIKA_TOKEN

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
COUNTER = 7171
SECRET = "console-browser-secret-0123456789"
WAIT = 10  # seconds an element may take to appear (each wait ends as soon as it does)



@pytest.fixture(scope="module")
def _stack(service_env, metrika_sandbox):
    """The app under `chalice local` on a free port (a subprocess, as `make run` starts it) and a headless
    Chromium, started side by side: (base URL, driver)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    assert not missing, f"{missing} not installed: `make test` installs chromium and chromium-driver (apt-get)"
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", CHALICE_LOCAL, "local", "--no-autoreload", "--host", "127.0.0.1",
                                "--port", str(port), "--stage", "dev"], cwd=ROOT, env={**os.environ},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    profile = tempfile.mkdtemp(prefix="console-chromium-")
    driver = None
    try:
        driver = start_chromium(profile)
        wait_http(f"http://127.0.0.1:{port}/health", process=process)
        yield f"http://127.0.0.1:{port}", driver
    finally:
        if driver is not None:
            driver.quit()
        process.kill()  # a test server holding nothing: no need to wait for a graceful stop
        process.wait()
        shutil.rmtree(profile, ignore_errors=True)


def start_chromium(profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     "--disable-extensions", "--disable-default-apps", f"--user-data-dir={profile}",
                     "--window-size=1280,900", "--lang=en-US"):
        options.add_argument(argument)
    # The driver given by path: Selenium Manager never looks for (or downloads) another one.
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


@pytest.fixture(scope="module")
def console(_stack):
    return _stack[0]


@pytest.fixture(scope="module")
def browser(_stack):
    return _stack[1]


@pytest.fixture(autouse=True)
def _screenshot_on_failure(request):
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and "browser" in request.fixturenames:
        folder = Path(tempfile.gettempdir()) / "console-screenshots"
        folder.mkdir(exist_ok=True)
        path = folder / f"{request.node.name[:80]}.png"
        request.getfixturevalue("browser").save_screenshot(str(path))
        print(f"screenshot: {path}")


def api(base, method, path, body=None, token=ADMIN_TOKEN):
    answer = requests.request(method, base + path, data=None if body is None else json.dumps(body),
                              headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                              timeout=20)
    return answer


@pytest.fixture
def crm(amocrm):
    amocrm.reset()
    amocrm.add_pipeline(7001, "Продажи", [(1001, "Первичный контакт"), (1002, "Переговоры")], is_main=True)
    amocrm.add_pipeline(8001, "Опт", [(2001, "Новый заказ")])
    contact = amocrm.create_contact("Иван Петров", phones=["+7 (916) 123-45-67"], emails=["ivan@example.com"],
                                    notify=False)
    lead = amocrm.create_lead("Заказ #1042", 7001, 1002, price=4980, contacts=[contact["id"]],
                              client_id="1717171717123456789", notify=False)
    return {"lead": lead, "contact": contact}


@pytest.fixture
def shop(console, integration_id, crm, amocrm, queue):
    """An amoCRM integration on the sandbox, no status mapping yet."""
    import app
    app._SOURCES.clear()  # the worker in this process reads the real amoCRM sandbox
    config = {"crm": "amocrm", "counter_id": COUNTER, "metrika_token": METRIKA_TOKEN, "timezone": "Europe/Moscow",
              "connection": {"base_url": amocrm.url, "access_token": amocrm.token, "account_id": str(amocrm.account_id),
                             "webhook_secret": SECRET}}
    assert api(console, "PUT", f"/integrations/{integration_id}", config).status_code == 200
    yield integration_id
    api(console, "DELETE", f"/integrations/{integration_id}")


def held_deal(console, integration_id, amocrm, crm, worker):
    """The deal's webhook delivered; the worker holds it (its stage is not mapped)."""
    amocrm.update_lead(crm["lead"]["id"], status_id=1002, price=5000)
    for _, body in amocrm.outbox:
        answer = requests.post(f"{console}/webhooks/amocrm/{integration_id}?secret={SECRET}", data=body, timeout=10,
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert answer.status_code == 200
    amocrm.outbox.clear()
    worker.drain(idle_rounds=1)


def link_for(console, integration_id):
    made = api(console, "POST", f"/integrations/{integration_id}/console-links", {"label": "browser test"})
    assert made.status_code == 200
    return made.json()["link"]


def wait_for(browser, css, timeout=WAIT):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, timeout).until(ec.visibility_of_element_located((By.CSS_SELECTOR, css)))


def wait_text(browser, css, text, timeout=WAIT):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, timeout).until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, css), text))
    return browser.find_element(By.CSS_SELECTOR, css)


def open_page(browser, url, language="en"):
    """`url` loaded afresh: no token kept from an earlier test, the language chosen. The storage is set
    on one of the console's own files (the same origin; no page to render)."""
    browser.get(url.split("#")[0].rsplit("/console", 1)[0] + "/console/i18n.js")
    browser.execute_script("sessionStorage.clear(); localStorage.setItem('mcb.lang', arguments[0]);", language)
    browser.get(url)  # another document: a full load, not a same-document fragment change


def row(browser, stage):
    from selenium.webdriver.common.by import By
    return browser.find_element(By.CSS_SELECTOR, f'tr[data-stage="{stage}"]')


# --- the tests ----------------------------------------------------------------------------------------------

def test_a_marketer_maps_a_new_pipelines_stage_and_the_held_deal_reaches_metrika(
        browser, console, shop, amocrm, crm, worker, metrika_sandbox):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    held_deal(console, shop, amocrm, crm, worker)
    lead_id = str(crm["lead"]["id"])
    assert lead_id not in metrika_sandbox.counter(COUNTER).orders
    link = link_for(console, shop)
    open_page(browser, link, language="ru")
    wait_for(browser, 'tr[data-stage="7001:1002"]')
    # The token left the URL for sessionStorage.
    assert "link=" not in browser.current_url and browser.current_url.endswith(f"#/i/{shop}/mapping")
    assert browser.execute_script("return sessionStorage.getItem('mcb.token')") == link.split("#link=")[1]
    stage = row(browser, "7001:1002")
    assert "Продажи: Переговоры" in stage.text and stage.find_element(By.CSS_SELECTOR, ".held").text == "1"
    assert "Опт: Новый заказ" in row(browser, "8001:2001").text  # every pipeline's stages, with names
    assert "Продажи: Успешно реализовано" in row(browser, "7001:142").text
    assert "Ничего не сохранено" in browser.find_element(By.ID, "mapping-state").text
    # Map the stage: a type, an id, a label; save.
    Select(stage.find_element(By.CSS_SELECTOR, "select")).select_by_value("IN_PROGRESS")
    ids = stage.find_elements(By.CSS_SELECTOR, "input")
    ids[0].send_keys("talks")
    ids[1].send_keys("Переговоры")
    if os.environ.get("CONSOLE_SCREENSHOT"):
        browser.set_window_size(1280, 900)
        browser.save_screenshot(str(ROOT / os.environ["CONSOLE_SCREENSHOT"]))
    browser.find_element(By.ID, "save-mapping").click()
    wait_text(browser, "#mapping-feedback", "Сохранено")
    assert "Метрика хранит это сопоставление" in browser.find_element(By.ID, "mapping-state").text
    statuses = metrika_sandbox.counter(COUNTER).order_statuses
    assert statuses["talks"] == {"id": "talks", "humanized": "Переговоры", "type": "IN_PROGRESS"}
    assert browser.switch_to.active_element.get_attribute("id") == "mapping-saved"  # the answer has the focus
    # The held deal flows into Metrika with that status, and the page, refreshed, holds nothing back.
    worker.drain(idle_rounds=1)
    assert metrika_sandbox.counter(COUNTER).orders[lead_id]["order_status"] == "talks"
    browser.find_element(By.ID, "refresh-mapping").click()
    wait_text(browser, 'tr[data-stage="7001:1002"] td.num', "0")
    assert browser.find_elements(By.CSS_SELECTOR, ".message.warning") == []  # no deal held any more
    # Read again, the page shows what Metrika holds. (Found afresh on each try: the refresh may render the
    # table once more after the count showed, and an element found before that is stale.)
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, WAIT, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda b: row(b, "7001:1002").find_element(By.CSS_SELECTOR, "input").get_attribute("value") == "talks")
    assert "Метрика хранит это сопоставление" in browser.find_element(By.ID, "mapping-state").text


def test_metrikas_refusal_is_shown_in_words_next_to_the_form(browser, console, shop, metrika_sandbox):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    open_page(browser, link_for(console, shop))
    stage = wait_for(browser, 'tr[data-stage="7001:1001"]')
    Select(stage.find_element(By.CSS_SELECTOR, "select")).select_by_value("PAID")
    stage.find_element(By.CSS_SELECTOR, "input").send_keys("first")
    metrika_sandbox.tokens = {"y0_someone-else": None}  # Metrika refuses our token
    try:
        browser.find_element(By.ID, "save-mapping").click()
        error = wait_for(browser, "#mapping-error")
    finally:
        metrika_sandbox.tokens = None
    assert error.get_attribute("role") == "alert"
    assert "Metrika did not accept the status mapping" in error.text and "Invalid oauth_token" in error.text
    assert "Nothing was changed: Metrika still holds no status" in error.text
    assert metrika_sandbox.counter(COUNTER).order_statuses == {}
    # Our own check, inline next to the field, before anything is sent.
    ids = stage.find_element(By.CSS_SELECTOR, "input")
    ids.clear()
    ids.send_keys("no spaces allowed")
    browser.find_element(By.ID, "save-mapping").click()
    wait_text(browser, "tr.has-error .field-error", "Latin letters")
    assert ids.get_attribute("aria-invalid") == "true"
    assert browser.switch_to.active_element == ids  # focus moved to the field to fix


def test_a_console_link_cannot_see_another_integration(browser, console, shop, integration_id):
    from selenium.webdriver.common.by import By
    other = integration_id + "-other"
    config = {"crm": "amocrm", "counter_id": COUNTER + 1, "metrika_token": METRIKA_TOKEN, "timezone": "UTC",
              "connection": {"base_url": "https://other.amocrm.ru", "access_token": "x" * 20,
                             "webhook_secret": SECRET}}
    assert api(console, "PUT", f"/integrations/{other}", config).status_code == 200
    try:
        link = link_for(console, shop)
        token = link.split("#link=")[1]
        assert api(console, "GET", f"/integrations/{other}/status-mapping", token=token).status_code == 403
        assert api(console, "GET", "/integrations", token=token).status_code == 403
        open_page(browser, link)
        wait_for(browser, "table")
        nav = browser.find_element(By.ID, "nav").text
        assert "Integrations" not in nav and "Console links" not in nav  # a link's page lists no other
        browser.get(f"{console}/console#/i/{other}/mapping")
        error = wait_for(browser, ".message.error")
        assert error.text == f"This console link does not give access to integration {other}."
        # A revoked link opens nothing, and the page says why. (A fresh one: a link used before is
        # refused once the authorizer's cache lets go, ConsoleLinks' own test.)
        revoked = link_for(console, shop)
        link_id = revoked.split("#link=")[1].split(".")[2]
        assert api(console, "DELETE", f"/integrations/{shop}/console-links/{link_id}").status_code == 200
        open_page(browser, revoked)
        error = wait_for(browser, ".message.error")
        assert error.text.startswith("This console link is not valid any more")
        assert "link=" not in browser.current_url
    finally:
        api(console, "DELETE", f"/integrations/{other}")


def test_the_delivery_page_shows_shares_chart_parked_deals_and_uploads(
        browser, console, shop, amocrm, crm, worker, metrika_sandbox):
    from selenium.webdriver.common.by import By
    held_deal(console, shop, amocrm, crm, worker)  # parked: its stage is not mapped
    entries = [{"crm_status": "7001:1001", "metrika_status_id": "new", "type": "IN_PROGRESS", "humanized": "Новая"}]
    assert api(console, "PUT", f"/integrations/{shop}/status-mapping", {"entries": entries}).status_code == 200
    other = amocrm.create_lead("Заказ #2", 7001, 1001, price=100, contacts=[crm["contact"]["id"]],
                               client_id="1818181818123456789")
    for _, body in amocrm.outbox:
        requests.post(f"{console}/webhooks/amocrm/{shop}?secret={SECRET}", data=body, timeout=10,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    amocrm.outbox.clear()
    worker.drain(idle_rounds=1)
    assert str(other["id"]) in metrika_sandbox.counter(COUNTER).orders
    open_page(browser, f"{console}/console#/i/{shop}/delivery")  # signed out: the sign-in form first
    wait_for(browser, "#token").send_keys("not-the-admin-token")
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    refused = wait_for(browser, ".message.error")
    assert refused.text == "This token was not accepted. Check it and sign in again."
    assert browser.execute_script("return sessionStorage.getItem('mcb.token')") is None
    browser.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    figures = wait_for(browser, "#figures")  # the page asked for, once signed in
    assert browser.execute_script("return sessionStorage.getItem('mcb.token')") == ADMIN_TOKEN
    assert ADMIN_TOKEN not in browser.current_url
    assert "Orders sent\n1" in figures.text and "with ClientID\n100%" in figures.text
    chart = browser.find_element(By.CSS_SELECTOR, "svg.chart")
    assert len(chart.find_elements(By.CSS_SELECTOR, "circle")) == 4  # one day, four series
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert today in browser.find_element(By.ID, "days").text
    parked = browser.find_element(By.ID, "parked")
    assert f"order {crm['lead']['id']}" in parked.text and "not in the status mapping" in parked.text
    assert "SENT" in browser.find_element(By.ID, "uploads").text
    parked.find_element(By.CSS_SELECTOR, "button").click()
    wait_text(browser, "#delivery-feedback", "queued again")


def test_attributes_are_mapped_from_the_crms_field_names(browser, console, shop, metrika_sandbox):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    open_page(browser, link_for(console, shop), language="ru")
    wait_for(browser, "tr[data-stage]")
    browser.get(f"{console}/console#/i/{shop}/attributes")
    wait_text(browser, "h1", "Атрибуты")
    browser.find_element(By.XPATH, "//button[text()='Добавить атрибут']").click()
    field = Select(browser.find_element(By.CSS_SELECTOR, "tbody tr select"))
    assert "Способ оплаты (order, 752015)" in [o.text for o in field.options]  # names read from the CRM
    field.select_by_value("752015")
    cells = browser.find_element(By.CSS_SELECTOR, "tbody tr")
    cells.find_elements(By.CSS_SELECTOR, "input")[0].send_keys("payment_method")
    browser.find_element(By.CSS_SELECTOR, "button.primary").click()
    wait_text(browser, "#attributes-feedback", "Сохранено атрибутов: 1")
    assert "payment_method" in metrika_sandbox.counter(COUNTER).custom_attributes["ORDER"]
    stored = api(console, "GET", f"/integrations/{shop}/attributes").json()["entries"]
    assert [(e["crm_field"], e["entity"], e["name"], e["type"]) for e in stored] == [
        ("752015", "order", "payment_method", "text")]


def test_the_mapping_form_works_from_the_keyboard_alone(browser, console, shop, metrika_sandbox):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    open_page(browser, link_for(console, shop))
    wait_for(browser, 'tr[data-stage="7001:1001"]')
    # Tab from the top of the page until the first stage's type selector has the focus.
    browser.find_element(By.TAG_NAME, "body").click()
    target = row(browser, "7001:1001").find_element(By.CSS_SELECTOR, "select")
    keys = ActionChains(browser)
    for _ in range(40):
        keys.send_keys(Keys.TAB).perform()
        if browser.switch_to.active_element == target:
            break
    assert browser.switch_to.active_element == target
    # The focus is visible: an outline of 3 px.
    assert browser.execute_script("return getComputedStyle(document.activeElement).outlineWidth") == "3px"
    keys.send_keys(Keys.ARROW_DOWN).perform()  # "IN_PROGRESS"
    assert target.get_attribute("value") == "IN_PROGRESS"
    keys.send_keys(Keys.TAB).send_keys("opened").send_keys(Keys.TAB).send_keys("Открыта").perform()
    keys.send_keys(Keys.ENTER).perform()  # Enter in a field submits the form
    wait_text(browser, "#mapping-feedback", "Saved")
    assert metrika_sandbox.counter(COUNTER).order_statuses["opened"]["humanized"] == "Открыта"


# The contrast of each visible text element against the background it sits on (WCAG 2 relative luminance),
# computed by the browser from the styles it applies.
CONTRAST = """
const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
const lum = ([r, g, b]) => [r, g, b].map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
  .reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0);
const background = (el) => { for (; el; el = el.parentElement) { const c = rgb(getComputedStyle(el).backgroundColor);
  if (c.length < 4 || c[3] > 0) return c.slice(0, 3); } return [255, 255, 255]; };
const worst = [];
for (const el of document.querySelectorAll('body *')) {
  if (!el.offsetParent || ![...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim())) continue;
  const [a, b] = [lum(rgb(getComputedStyle(el).color).slice(0, 3)), lum(background(el))];
  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  if (ratio < 4.5) worst.push([el.tagName, el.className, el.textContent.slice(0, 30), ratio.toFixed(2)]);
}
return worst;
"""


def test_no_page_overflows_at_a_phone_or_a_laptop_width(browser, console, shop):
    """Nothing wider than the window at 360 and 1280 px, and every text readable (contrast ≥ 4.5:1)."""
    open_page(browser, link_for(console, shop))
    wait_for(browser, 'tr[data-stage="7001:1001"]')
    try:
        for page in ("mapping", "delivery", "attributes"):
            browser.get(f"{console}/console#/i/{shop}/{page}")
            wait_for(browser, "form, #figures")
            for width in (360, 1280):
                browser.set_window_size(width, 900)
                inner, scroll = browser.execute_script(
                    "return [document.documentElement.clientWidth, document.documentElement.scrollWidth]")
                assert scroll <= inner, (page, width, scroll, inner)
            assert browser.execute_script(CONTRAST) == [], page  # every text at least 4.5:1
    finally:
        browser.set_window_size(1280, 900)
