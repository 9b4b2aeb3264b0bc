"""The soft gate's form as a reviewer sees it: the Prefect UI's Resume dialog in a real browser.

A real Prefect server with its UI, a real flow run paused in `wait_for_approval`, and Debian's
headless Chromium driven by Selenium: the dialog must ask for a decision (a choice, nothing
preselected), a reason and an approver (both required), show the question and the evidence
link, refuse an empty reason, and resume the run with what was typed.

Debian's browser is required, never skipped: without it this test fails with the install command.
Every wait is on a condition with a generous timeout: the UI takes 20-50 s to load on a busy
2-core machine.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from prefect import flow
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from canaryflow.app.approvals import prefect_client
from canaryflow.contracts import ApprovalConfig, ApprovalDecision
from canaryflow.local.stack import prefect_server, url_of
from tasks.approval import wait_for_approval
from tests.paused_runs import PausedRun, paused_flow_run

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "apt-get install -y --no-install-recommends chromium chromium-driver"
# As the machine notes say: headless, no sandbox as root, and no background connections that
# this machine's closed network would refuse; a fresh profile is added per test.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)
UI_WAIT_S = 120.0  # a page load alone took 20-50 s on a loaded 2-core machine

FLOW = "approval-form-e2e"
QUESTION = "ship v1.2? cost is 1.4x"
EVIDENCE_KEY = "canary-my-assistant-gates"
FIELDS = ("Decision", "Reason", "Approver")
CONTROLS = "*[self::select or self::textarea or self::input]"
T = TypeVar("T")


@flow(name=FLOW)
def ask() -> tuple[ApprovalDecision, bool]:
    config = ApprovalConfig(timeout_s=300, poll_s=1)
    return wait_for_approval(QUESTION, config, "probe", EVIDENCE_KEY)


@pytest.fixture(scope="module")
def prefect_ui(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real `prefect server` with its UI; yields its base URL (the API is under /api)."""
    server = prefect_server(tmp_path_factory.mktemp("prefect-ui"), ui=True)
    request.addfinalizer(server.stop)
    server.start(timeout_s=180)
    return url_of(server)


@pytest.fixture
def paused_run(prefect_ui: str) -> Iterator[PausedRun]:
    name = f"form-{uuid.uuid4().hex[:8]}"
    api = f"{prefect_ui}/api"
    with paused_flow_run(ask, FLOW, name, api, timeout_s=90, ui=prefect_ui) as run:
        yield run


@pytest.fixture
def browser(request: pytest.FixtureRequest, tmp_path: Path) -> WebDriver:
    """Debian's headless Chromium through Debian's chromedriver; a missing one fails the test."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: this test needs Debian's browser. "
            f"Install it with `{INSTALL}` (as root; `.ci/run` does it when missing)",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    request.addfinalizer(driver.quit)
    driver.set_page_load_timeout(UI_WAIT_S)
    return driver


def is_paused(base_url: str, run_id: str) -> bool:
    """The run's state as the API tells it (not as the page shows it)."""
    return state_of(base_url, run_id) == "PAUSED"


def state_of(base_url: str, run_id: str) -> str:
    with prefect_client(f"{base_url}/api") as client:
        state = client.read_flow_run(uuid.UUID(run_id)).state
    return state.type.value if state is not None else "NONE"


@contextlib.contextmanager
def page_shown_on_failure(driver: WebDriver, folder: Path) -> Iterator[None]:
    """On any failure: print the page source (icons' paths cut), keep it and a screenshot."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(WebDriverException):
            source = re.sub(r"<svg\b.*?</svg>", "<svg/>", driver.page_source, flags=re.S)
            (folder / "failure.html").write_text(source)
            driver.save_screenshot(str(folder / "failure.png"))
            print(f"--- page source at failure ({driver.current_url}) ---\n{source}")
            print(f"--- screenshot: {folder / 'failure.png'}")
        raise


def wait_until(
    driver: WebDriver, what: str, condition: Callable[[WebDriver], T], timeout_s: float = UI_WAIT_S
) -> T:
    """WebDriverWait with a message that says what was awaited."""
    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.25).until(condition)
    except TimeoutException:
        pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}", pytrace=False)


def the_dialog(driver: WebDriver) -> WebElement:
    """The open dialog (the Resume one: the page has no other)."""

    def shown(d: WebDriver) -> WebElement | None:
        dialogs = d.find_elements(By.CSS_SELECTOR, "[role='dialog']")
        return next((e for e in dialogs if e.is_displayed()), None)

    found = wait_until(driver, "the Resume dialog", shown)
    assert found is not None
    return found


def control_of(dialog: WebElement, label: str) -> WebElement:
    """The visible input under a field's label: the nearest block around the label's text that
    holds a control is that field's own."""
    controls = dialog.find_elements(
        By.XPATH,
        f".//*[normalize-space(text())='{label}']/ancestor::*[.//{CONTROLS}][1]//{CONTROLS}",
    )
    shown = [c for c in controls if c.is_displayed()]
    assert shown, f"no visible control under the label {label!r}: {dialog.text!r}"
    return shown[0]


def button(scope: WebDriver | WebElement, text: str) -> WebElement | None:
    """A visible, enabled button whose text is `text`, if there is one yet."""
    found = [
        b
        for b in scope.find_elements(By.XPATH, f".//button[normalize-space()='{text}']")
        if b.is_displayed() and b.is_enabled()
    ]
    return found[0] if found else None


def click(driver: WebDriver, scope: WebDriver | WebElement, text: str) -> None:
    found = wait_until(driver, f"a {text!r} button", lambda _: button(scope, text))
    assert found is not None
    found.click()


def test_the_resume_form_asks_for_a_decision_a_reason_and_an_approver(
    browser: WebDriver, prefect_ui: str, paused_run: PausedRun, tmp_path: Path
) -> None:
    evidence = f"{prefect_ui}/artifacts/key/{EVIDENCE_KEY}"
    with page_shown_on_failure(browser, tmp_path):
        browser.get(f"{prefect_ui}/runs/flow-run/{paused_run.id}")
        click(browser, browser, "Resume")
        dialog = the_dialog(browser)
        wait_until(browser, "the form's fields", lambda _: all(f in dialog.text for f in FIELDS))

        # What the reviewer reads: the question, then the evidence as a link.
        lines = [line.strip() for line in dialog.text.splitlines()]
        assert QUESTION in lines, lines
        assert f"Evidence: {evidence}" in " ".join(lines), lines
        links = [a.get_attribute("href") for a in dialog.find_elements(By.TAG_NAME, "a")]
        assert evidence in links, links

        # Every field required: its label is its bare name, with no "(Optional)" anywhere.
        assert "(Optional)" not in dialog.text, lines
        for name in FIELDS:
            assert name in lines, f"label {name!r} not shown as is: {lines}"

        # The decision is a choice between approve and reject, and nothing is chosen yet.
        decision = control_of(dialog, "Decision")
        assert decision.tag_name == "select", (
            f"Decision rendered as <{decision.tag_name} type={decision.get_attribute('type')}>, "
            "not as a choice"
        )
        choice = Select(decision)
        assert [o.text.strip() for o in choice.options if o.text.strip()] == ["approve", "reject"]
        assert choice.all_selected_options == []
        assert browser.execute_script("return arguments[0].selectedIndex", decision) == -1
        reason, approver = control_of(dialog, "Reason"), control_of(dialog, "Approver")
        assert reason.tag_name in ("textarea", "input") and reason.get_attribute("value") == ""
        assert approver.tag_name in ("textarea", "input") and approver.get_attribute("value") == ""

        # An empty reason is refused in the dialog, and the run stays paused.
        choice.select_by_visible_text("approve")
        approver.send_keys("alice")
        click(browser, dialog, "Submit")
        refusal = wait_until(
            browser,
            "the form to refuse the empty reason",
            lambda _: next(
                (ln for ln in dialog.text.splitlines() if re.search(r"reason.*required", ln, re.I)),
                None,
            ),
        )
        print(f"the form refused an empty reason with: {refusal!r}")
        assert the_dialog(browser).is_displayed()
        assert is_paused(prefect_ui, paused_run.id), state_of(prefect_ui, paused_run.id)
        assert "answer" not in paused_run.box and "error" not in paused_run.box

        # Filled in: approve, why, who. Kept as a picture for a person to look at.
        reason.send_keys("cost within budget")
        assert reason.get_attribute("value") == "cost within budget"
        assert approver.get_attribute("value") == "alice"
        assert Select(decision).first_selected_option.text.strip() == "approve"
        screenshot = tmp_path / "approval-form-filled.png"
        assert browser.save_screenshot(str(screenshot)), screenshot
        print(f"screenshot of the filled form: {screenshot}")
        assert is_paused(prefect_ui, paused_run.id), "the run resumed before the form was sent"

        click(browser, dialog, "Submit")
        answer = paused_run.answer(timeout_s=UI_WAIT_S)
        assert answer == (
            ApprovalDecision(approve=True, reason="cost within budget", approver="alice"),
            False,
        )
        assert state_of(prefect_ui, paused_run.id) == "COMPLETED"
