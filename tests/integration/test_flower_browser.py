"""Flower as a person sees it: headless Chromium on the tasks page while commands and events flow.

The other Flower checks (test_up.py) read Flower's JSON API. This one reads the rendered page, so
it also catches what the API cannot: a task that is in Flower's state but not on the screen, a
name or ID the page does not show, a login that the API accepts but the browser does not get past.
It drives Debian's ``chromium`` through its ``chromedriver`` (``scripts/browser.sh`` installs both;
``make test`` runs it), never a browser that a test tool downloads.

It runs on Redis only: what the page shows comes from Flower's task events, which are the same on
both brokers (test_up.py checks them on each), and one more browser and set of pools per broker
would double the slowest test module for nothing new.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from postroom import MessageBus
from postroom._celery.tasks import delivery_id
from tasks.assets import BindDevice, DeviceBound, RegisterAsset
from tests.support import ROOT, BrokerContext, broker_context, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]

USER, PASSWORD = "watcher", "correct-horse"
#: The machine runs other suites at the same time on two cores: pages and workers can be slow.
PAGE_TIMEOUT = 90.0
#: Seconds between reloads of a tasks page that does not show what is expected yet.
RELOAD_EVERY = 3.0
#: Set to 1 to refresh the README's picture (docs/flower-tasks.png); CI leaves the tree alone.
SAVE_SCREENSHOT = os.environ.get("POSTROOM_SAVE_SCREENSHOT") == "1"
README_SCREENSHOT = ROOT / "docs" / "flower-tasks.png"
DELIVERIES = ("search", "analytics", "notifications")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Flower:
    """`postroom up --no-api` on an isolated Redis context, with Flower behind basic auth."""

    def __init__(self, broker: BrokerContext) -> None:
        self.broker = broker
        self.port = _free_port()
        self.log = broker.workdir / "up.log"
        env = dict(
            broker.env,
            POSTROOM_FLOWER_PORT=str(self.port),
            POSTROOM_FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}",
        )
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "up", "--no-api"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def url(self, path: str, *, credentials: bool = True) -> str:
        login = f"{USER}:{PASSWORD}@" if credentials else ""
        return f"http://{login}127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def flower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    """Every pool and Flower, as `postroom up` starts them for a user, on Redis only."""
    # No test handlers: the pools run exactly the services a user gets.
    broker = broker_context("redis", tmp_path_factory.mktemp("flower-browser"), imports="")
    running = Flower(broker)
    try:
        wait_for(
            lambda: "every pool is ready" in running.output() or running.proc.poll() is not None,
            timeout=180,
            interval=0.5,
        )
        assert running.proc.poll() is None, running.output()
        yield running
    finally:
        running.stop()
        broker.close()


def _executable(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `bash scripts/browser.sh` (`make test` does)")
    return path


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """A fresh headless Chromium per test: no credentials or table state carried between tests."""
    options = Options()
    options.binary_location = _executable("chromium")
    # The flags of this machine's own Chromium check: without the background-networking ones,
    # Chromium keeps trying Google's hosts, which this machine's closed network refuses.
    for flag in (
        "--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--window-size=1500,900", f"--user-data-dir={tmp_path / 'profile'}",
    ):  # fmt: skip
        options.add_argument(flag)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to start as root otherwise
    # Both paths given, so Selenium Manager never looks for (or downloads) a driver or a browser.
    service = Service(_executable("chromedriver"), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def _status(driver: webdriver.Chrome) -> int:
    """The HTTP status of the page the browser shows, as the browser itself recorded it."""
    status = driver.execute_script(
        "return performance.getEntriesByType('navigation')[0].responseStatus;"
    )
    return int(status)


def _rows(driver: webdriver.Chrome) -> dict[str, str]:
    """The task table as shown: each row's visible text by its row ID (Flower uses the task UUID)."""
    rows: dict[str, str] = {}
    try:
        for row in driver.find_elements(By.CSS_SELECTOR, "#tasks-table tbody tr[id]"):
            rows[row.get_attribute("id") or ""] = row.text
    except StaleElementReferenceException:
        return {}  # DataTables redrew the table while it was read: read it again
    return rows


def _wait_for_rows(
    driver: webdriver.Chrome, showing: Callable[[dict[str, str]], bool], what: str
) -> dict[str, str]:
    """Until the rows shown (visible text by row ID) satisfy ``showing``; those rows.

    The table is fetched when the page loads or the search changes, never on its own, so a task
    still running then stays "STARTED" on screen: reload the page, as a person would, until it
    settles. The search typed in is kept across reloads (DataTables saves it in the page's state).
    """
    shown: dict[str, str] = {}
    last_load = time.monotonic()

    def done(d: webdriver.Chrome) -> bool:
        nonlocal last_load
        shown.clear()
        shown.update(_rows(d))
        if showing(shown):
            return True
        if time.monotonic() - last_load > RELOAD_EVERY:
            d.refresh()
            last_load = time.monotonic()
        return False

    try:
        WebDriverWait(driver, PAGE_TIMEOUT, poll_frequency=0.5).until(done)
    except TimeoutException:
        raise AssertionError(f"the tasks page never showed {what}; it showed {shown}") from None
    return shown


def _has(rows: dict[str, str], row_id: str, *texts: str) -> bool:
    return all(text in rows.get(row_id, "") for text in texts)


def _named(rows: dict[str, str], prefix: str) -> dict[str, str]:
    """The rows whose task name (the first word shown) starts with ``prefix``: row ID to name."""
    names = {row_id: (text.split() or [""])[0] for row_id, text in rows.items()}
    return {row_id: name for row_id, name in names.items() if name.startswith(prefix)}


def _search(driver: webdriver.Chrome, text: str) -> None:
    """Type into the tasks page's search box, as a person following a conversation does."""
    box: WebElement = WebDriverWait(driver, PAGE_TIMEOUT).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#tasks-table_filter input[type=search]")
    )
    box.clear()
    box.send_keys(text)


def test_without_credentials_flower_answers_401_and_shows_no_task(
    flower: Flower, browser: webdriver.Chrome
) -> None:
    browser.get(flower.url("/tasks", credentials=False))
    assert _status(browser) == 401
    assert not browser.find_elements(By.ID, "tasks-table")
    # The rows come from a second request, which must not be open either.
    request = urllib.request.Request(flower.url("/tasks/datatable", credentials=False))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401


def test_tasks_page_lists_commands_and_event_deliveries_by_type_and_correlation_id(
    flower: Flower, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    browser.get(flower.url("/tasks"))
    assert _status(browser) == 200
    WebDriverWait(browser, PAGE_TIMEOUT).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#tasks-table_info")
    )

    # Sent while the page is open, as a person watching Flower during a deploy sees them arrive.
    bus = MessageBus(flower.broker.app, source="browser-test")
    register = bus.send(RegisterAsset(name="Crane 3", attributes={"site": "dock 4"}))
    asset_id = register.reply(timeout=PAGE_TIMEOUT).value["asset_id"]
    bind = bus.send(BindDevice(asset_id=asset_id, device_id=uuid.uuid4()))
    assert bind.reply(timeout=PAGE_TIMEOUT).status == "succeeded"
    # An event published straight onto the bus, by a process that is no service's handler.
    audit = str(uuid.uuid4())
    published = bus.publish(
        DeviceBound(asset_id=asset_id, device_id=uuid.uuid4(), bound_at=datetime.now(UTC)),
        correlation_id=audit,
    )

    # The whole history: each command under its type, each pool's delivery under type@pool.
    deliveries = {delivery_id(published, pool): pool for pool in ("analytics", "notifications")}
    _wait_for_rows(
        browser,
        lambda rows: (
            _has(rows, register.correlation_id, "assets.RegisterAsset", "SUCCESS")
            and _has(rows, bind.correlation_id, "assets.BindDevice", "SUCCESS")
            and all(
                # the args column shows the envelope's IDs (see launcher.flower_argv)
                _has(
                    rows,
                    task_id,
                    f"assets.DeviceBound@{pool}",
                    "SUCCESS",
                    f"correlation_id={audit}",
                )
                for task_id, pool in deliveries.items()
            )
        ),
        "both commands and each pool's delivery of the published event",
    )

    # Following one conversation: its correlation ID finds the command (whose task UUID it is)
    # and each pool's delivery of the event the command caused, and nothing of the others.
    _search(browser, register.correlation_id)
    everyone = {f"assets.AssetRegistered@{pool}" for pool in DELIVERIES}
    shown = _wait_for_rows(
        browser,
        lambda rows: (
            _has(rows, register.correlation_id, "assets.RegisterAsset", register.correlation_id)
            and set(_named(rows, "assets.AssetRegistered@").values()) == everyone
            and not _named(rows, "assets.BindDevice")
            and not _named(rows, "assets.DeviceBound")
        ),
        f"the conversation of {register.correlation_id} alone",
    )
    caused = _named(shown, "assets.AssetRegistered@")
    assert len(caused) == len(DELIVERIES)  # one task per pool, not one for all

    screenshot = tmp_path / "flower-tasks.png"
    assert browser.save_screenshot(str(screenshot)), "the browser took no screenshot"
    if SAVE_SCREENSHOT:
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(screenshot, README_SCREENSHOT)

    # A delivery's own page shows the envelope: the correlation ID it was found by.
    delivery = next(iter(caused))
    browser.find_element(By.CSS_SELECTOR, f'tr[id="{delivery}"] a[href*="/task/"]').click()
    WebDriverWait(browser, PAGE_TIMEOUT).until(lambda d: d.find_elements(By.ID, "task-page"))
    details = browser.find_element(By.ID, "task-page").text
    assert f"correlation_id={register.correlation_id}" in details
    assert "message_id=" in details
    assert "asset_id" in details  # the event's payload, as keyword arguments
