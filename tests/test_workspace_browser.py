"""The workspace in headless Chromium against the real daemon: filters narrow the worklist and survive a
reload from the URL; bulk assign changes every selected row; an action on the referral page shows on the
timeline with the person from the user header and in the audit log; the weekly page shows the store's figures.

The person is sent the way an authenticating reverse proxy would send it (``X-Forwarded-User`` on every
request, through Chromium's DevTools ``Network.setExtraHTTPHeaders``), from loopback, a trusted proxy address.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from sqlalchemy import select

from refloop.clock import FixedClock
from refloop.store import weekly
from refloop.store.models import Alert, AuditEntry
from tests.test_dashboard_browser import _browser
from tests.test_workspace import NOW, built, settings_for, store  # noqa: F401  (fixtures)
from tests.utils import running_daemon

PERSON = "dana.r"


def _shot(browser: Any, tmp_path: Path, name: str) -> None:
    browser.save_screenshot(str(tmp_path / name))
    shots = os.environ.get("REFLOOP_SCREENSHOT_DIR")
    if shots:
        shutil.copy(tmp_path / name, Path(shots) / name)


def test_worklist_filters_bulk_assign_and_referral_actions(store: str, tmp_path: Path) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    settings = settings_for(store, user_header="X-Forwarded-User")
    with running_daemon(settings, clock=FixedClock(NOW)) as d:
        engine = d.server.engine
        assert engine is not None
        browser: Any = _browser()
        try:
            browser.execute_cdp_cmd("Network.enable", {})
            browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"X-Forwarded-User": PERSON}})
            base = f"http://127.0.0.1:{d.http_port}"

            def rows() -> list[Any]:
                return browser.find_elements(By.CSS_SELECTOR, "tr[data-alert]")

            # the person's own list is empty (nothing is assigned to dana.r yet): the page says so
            browser.get(f"{base}/worklist")
            assert "Worklist of dana.r" in browser.page_source and not rows()
            browser.find_element(By.LINK_TEXT, "Everyone, no filters").click()
            everyone = len(rows())
            assert everyone > 10
            # narrow by stage and specialty through the form
            Select(browser.find_element(By.NAME, "stage")).select_by_value("visit")
            browser.find_element(By.NAME, "specialty").send_keys("CARD")
            browser.find_element(By.XPATH, "//form[@aria-label='Filters']//button[@type='submit']").click()
            WebDriverWait(browser, 15).until(lambda b: "stage=visit" in b.current_url)
            narrowed = [r.get_attribute("data-alert") for r in rows()]
            assert 0 < len(narrowed) < everyone
            assert all(r.find_elements(By.TAG_NAME, "td")[1].text == "Visit" for r in rows())
            query = parse_qs(urlparse(browser.current_url).query, keep_blank_values=True)
            assert query["stage"] == ["visit"] and query["specialty"] == ["CARD"] and query["owner"] == [""]
            browser.refresh()
            assert [r.get_attribute("data-alert") for r in rows()] == narrowed
            browser.get(browser.current_url)  # a bookmark of the view shows the same rows
            assert [r.get_attribute("data-alert") for r in rows()] == narrowed
            _shot(browser, tmp_path, "worklist.png")

            # bulk assign the first three rows of everyone's list
            browser.get(f"{base}/worklist?owner=")
            chosen = [int(r.get_attribute("data-alert")) for r in rows()[:3]]
            for r in rows()[:3]:
                r.find_element(By.CSS_SELECTOR, "input[name=alert]").click()
            Select(browser.find_element(By.NAME, "action")).select_by_value("assign")
            browser.find_element(By.CSS_SELECTOR, "fieldset.bulk input[name=owner]").send_keys("erin")
            browser.find_element(By.XPATH, "//button[normalize-space()='Apply to selected']").click()
            flash = WebDriverWait(browser, 15).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".flash"))
            assert "assign: 3 alerts" in flash[0].text
            with engine.connect() as conn:
                owners = dict(conn.execute(select(Alert.id, Alert.owner).where(Alert.id.in_(chosen))).all())
                assigned = conn.execute(select(AuditEntry.actor, AuditEntry.target).where(
                    AuditEntry.action == "alert_assign")).all()
            assert owners == dict.fromkeys(chosen, "erin")
            assert sorted(assigned) == sorted((PERSON, f"alert:{a}") for a in chosen)
            browser.get(f"{base}/worklist?owner=erin")
            assert sorted(int(r.get_attribute("data-alert")) for r in rows()) == sorted(chosen)

            # the referral page: the clock first, then an action recorded with the person
            rows()[0].find_element(By.CSS_SELECTOR, "th a").click()
            WebDriverWait(browser, 15).until(lambda b: b.find_elements(By.ID, "clock"))
            clock = browser.find_element(By.ID, "clock")
            assert clock.find_element(By.CSS_SELECTOR, "[data-owner]").text == "erin"
            assert "level" in clock.text and clock.find_elements(By.CSS_SELECTOR, "time[title]")
            note = clock.find_element(By.NAME, "note")
            note.send_keys("phoned the specialist's desk")
            note.submit()
            WebDriverWait(browser, 15).until(lambda b: "done=" in b.current_url)
            hold = browser.find_element(By.CSS_SELECTOR, "#clock input[name=reason]")
            hold.send_keys("patient travelling")
            hold.submit()
            WebDriverWait(browser, 15).until(lambda b: "put the referral on hold" in b.page_source)
            entries = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "table.timeline tbody tr")]
            assert any(PERSON in e and "phoned the specialist's desk" in e for e in entries)
            assert any(PERSON in e and "patient travelling" in e for e in entries)
            held = browser.find_element(By.CSS_SELECTOR, "#clock [data-hold]").text
            assert PERSON in held and "patient travelling" in held
            assert browser.find_elements(By.CSS_SELECTOR, "table.timeline a[href^='/messages/']")
            browser.get(browser.current_url.split("?")[0])  # the page as it opens, for the screenshot
            _shot(browser, tmp_path, "referral.png")
            with engine.connect() as conn:
                acted = {a for (a,) in conn.execute(select(AuditEntry.action).where(AuditEntry.actor == PERSON))}
            assert {"alert_note", "alert_hold", "view"} <= acted

            # the weekly review shows what the store computes for that week
            browser.get(f"{base}/weekly?weeks_back=2")
            with engine.connect() as conn:
                doc = weekly.review(conn, d.server.settings, NOW, weekly.ZoneInfo("UTC"), weeks_back=2)
            shown = {e.get_attribute("data-total"): int(e.text)
                     for e in browser.find_elements(By.CSS_SELECTOR, "[data-total]")}
            assert shown == doc["this_week"]["totals"] and sum(shown.values()) > 0
        finally:
            browser.quit()


def test_screen_sizes_keyboard_and_no_external_resources(store: str) -> None:  # noqa: F811
    """Every workspace page loads only from the daemon itself and fits a tablet without sideways scrolling
    (wide tables scroll inside their own region); the bulk form works from the keyboard alone."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    settings = dataclasses.replace(settings_for(store))
    with running_daemon(settings, clock=FixedClock(NOW - timedelta(days=1))) as d:
        browser: Any = _browser()
        try:
            base = f"http://127.0.0.1:{d.http_port}"
            for path in ("/worklist?owner=", "/weekly", "/referrals/1"):
                for width in (1280, 820):
                    browser.set_window_size(width, 900)
                    browser.get(base + path)
                    srcs = [e.get_attribute("src") or e.get_attribute("href") or "" for e in
                            browser.find_elements(By.CSS_SELECTOR, "script[src], link[href], img[src]")]
                    assert all(s.startswith(base) for s in srcs), srcs
                    overflow = browser.execute_script(
                        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
                    assert overflow <= 1, (path, width, overflow)
            browser.set_window_size(1280, 900)
            browser.get(f"{base}/worklist?owner=&status=open")
            boxes = browser.find_elements(By.CSS_SELECTOR, "tbody input[name=alert]")[:2]
            for box in boxes:
                box.send_keys(Keys.SPACE)  # ticked by the keyboard
            browser.find_element(By.NAME, "action").send_keys("acknowledge")
            browser.find_element(By.XPATH, "//button[normalize-space()='Apply to selected']").send_keys(Keys.ENTER)
            flash = WebDriverWait(browser, 15).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".flash"))
            assert "acknowledge: 2 alerts" in flash[0].text
        finally:
            browser.quit()
