"""The dashboard in headless Chromium (Selenium): KPIs equal the API's, a worklist action applies.

Needs the Debian packages ``chromium`` and ``chromium-driver``; without them the test is skipped, except
in CI (env ``CI`` set), where it fails so that a missing browser is never mistaken for a pass.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

import pytest
from sqlalchemy import select

from refloop import simulate as sim
from refloop.store import scan as stall_scan
from refloop.store.models import Alert, AuditEntry
from tests.utils import make_settings, running_daemon

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser() -> object:
    missing = [p for p in (CHROMIUM, DRIVER) if not (Path(p).exists() or shutil.which(Path(p).name))]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("python package selenium")
    if missing:
        why = f"headless browser missing ({', '.join(missing)}): apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,800"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def test_dashboard_kpis_and_worklist_action(sqlite_url: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    now = datetime(2026, 10, 1, tzinfo=UTC)
    run = sim.Simulation(150, seed=3, now=now).build()
    with running_daemon(make_settings(sqlite_url)) as d:
        sim.send(run, "127.0.0.1", d.port)
        engine = d.server.engine
        assert engine is not None
        assert stall_scan.run_scan(engine, d.server.settings, now) is not None  # the scan at the simulated instant
        query = urlencode({"from": (now - timedelta(days=365)).date().isoformat(),
                           "to": (now + timedelta(days=1)).date().isoformat(), "now": now.isoformat()})
        status, api = d.get(f"/api/report?{query}")
        assert status == 200 and api["totals"]["sent"] == 150
        browser = _browser()
        try:
            base = f"http://127.0.0.1:{d.http_port}"
            browser.get(f"{base}/?{query}")  # type: ignore[attr-defined]
            kpi = {e.get_attribute("data-kpi"): e.text for e in browser.find_elements(By.CSS_SELECTOR, "[data-kpi]")}  # type: ignore[attr-defined]
            assert kpi["sent"] == str(api["totals"]["sent"])
            assert kpi["leaks"] == str(api["totals"]["leaks"])
            closure = api["rates"]["loop_closure"]["rate"]
            assert kpi["loop_closure"] == f"{closure * 100:.1f}%"
            browser.save_screenshot(str(tmp_path / "dashboard.png"))  # type: ignore[attr-defined]
            rows = browser.find_elements(By.CSS_SELECTOR, "tr[data-alert]")  # type: ignore[attr-defined]
            assert rows, "the scan should have put stalled referrals on the worklist"
            alert_id = int(rows[0].get_attribute("data-alert"))
            rows[0].find_element(By.XPATH, ".//button[normalize-space()='Acknowledge']").click()
            flash = WebDriverWait(browser, 15).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".flash"))
            assert "acknowledge alert" in flash[0].text
            with engine.connect() as conn:
                assert conn.execute(select(Alert.status).where(Alert.id == alert_id)).scalar_one() == "acknowledged"
            link = browser.find_element(By.CSS_SELECTOR, "#leaks a")  # type: ignore[attr-defined]
            link.click()
            assert WebDriverWait(browser, 15).until(lambda b: "Timeline" in b.page_source)
            browser.save_screenshot(str(tmp_path / "referral.png"))  # type: ignore[attr-defined]
        finally:
            browser.quit()  # type: ignore[attr-defined]
        with engine.connect() as conn:
            actions = {(a, t.split(":")[0]) for a, t in conn.execute(select(AuditEntry.action, AuditEntry.target))}
        assert ("view", "referral") in actions
    shots = os.environ.get("REFLOOP_SCREENSHOT_DIR")
    if shots:
        shutil.copy(tmp_path / "dashboard.png", Path(shots) / "dashboard.png")
        shutil.copy(tmp_path / "referral.png", Path(shots) / "referral.png")


def test_login_cookie_unlocks_the_dashboard(sqlite_url: str) -> None:
    import urllib.error
    import urllib.request
    from http.cookiejar import CookieJar

    settings = make_settings(sqlite_url)
    settings = dataclasses.replace(settings, http=dataclasses.replace(settings.http, token="s3cret"))
    with running_daemon(settings) as d:
        base = f"http://127.0.0.1:{d.http_port}"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/", timeout=10)
        assert err.value.code == 401
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        # the token goes in a POST form body (never the URL); the cookie it sets opens the dashboard
        with opener.open(f"{base}/login", data=b"token=s3cret", timeout=10) as resp:
            assert resp.status == 200 and b"refloop" in resp.read()
        with opener.open(f"{base}/", timeout=10) as resp:
            assert resp.status == 200 and b"Cohort" in resp.read()
