"""The message pages in headless Chromium: search by patient from the form, open a message, show its raw
text behind the button, and find the audit row (skipped without chromium, failed in CI; see
``tests/test_dashboard_browser.py``)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from refloop.store.models import AuditEntry
from tests.samples import ref_msg, siu_msg
from tests.test_dashboard_browser import _browser
from tests.utils import MllpClient, make_settings, running_daemon


def test_search_open_and_show_raw(sqlite_url: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with running_daemon(make_settings(sqlite_url)) as d:
        with MllpClient(d.port) as client:
            client.send(ref_msg("BR1", mrn="BRW555", cid="REF-BR1"))
            client.send(siu_msg("BA1", placer="BR1", mrn="BRW555", cid="SIU-BR1"))
            client.send(siu_msg("BA2", mrn="SOMEONE9", cid="SIU-BR2"))
        browser = _browser()
        try:
            base = f"http://127.0.0.1:{d.http_port}"
            browser.get(base + "/")  # type: ignore[attr-defined]
            browser.find_element(By.LINK_TEXT, "Messages").click()  # type: ignore[attr-defined]
            wait = WebDriverWait(browser, 20)
            field = wait.until(lambda b: b.find_element(By.NAME, "patient"))
            field.send_keys("BRW555^CLINIC")
            field.submit()
            wait.until(lambda b: "Searched by a patient identifier" in b.page_source)
            rows = browser.find_elements(By.CSS_SELECTOR, "tbody tr")  # type: ignore[attr-defined]
            assert [r.find_elements(By.TAG_NAME, "td")[4].text for r in rows] == ["SIU-BR1", "REF-BR1"]
            assert "BRW555" not in browser.page_source  # type: ignore[attr-defined]
            assert "BRW555" not in browser.current_url  # type: ignore[attr-defined]  # posted, not in the URL
            rows[0].find_element(By.TAG_NAME, "a").click()
            button = wait.until(lambda b: b.find_element(By.XPATH, "//button[text()='Show raw message']"))
            button.click()
            raw = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "pre.raw")).text
            assert raw.startswith("MSH|^~\\&|SCHED|HEART|") and "SCH|BA1^SCHED|" in raw
        finally:
            browser.quit()  # type: ignore[attr-defined]
        assert d.server.engine is not None
        with d.server.engine.connect() as conn:
            audit = [(r.action, r.target) for r in conn.execute(select(AuditEntry.action, AuditEntry.target))]
    assert ("search", "messages:patient") in audit
    assert [a for a in audit if a[0] == "raw"] == [("raw", "message:2")]
