"""The administration page in a real headless Chromium, against a live worker.

The worker runs in this process (real intake from the test's Kafka topic,
real PostgreSQL, real dispatcher); Microsoft 365 uses the real provider (no
consent yet: every write fails with `consent_missing`), CalDAV writes to the
in-memory calendar where one mailbox does not exist.

Screenshots are saved under `test-artifacts/browser/` (kept by CI as
artifacts); with ABSENCE_SYNC_DOCS_SCREENSHOTS=1 they also refresh the ones
in `docs/images/` that `docs/administration.md` shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from consumer import store
from consumer.config import SyncConfig
from consumer.metrics import Metrics
from consumer.secrets import SecretBox
from consumer.settings import Settings
from consumer.worker import Endpoints, run_worker
from tests.admin_world import Calendars, absence, idle, new_token
from tests.conftest import Publisher, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
DOCS_IMAGES = ROOT / "docs" / "images"
GHOST = "ghost@acme.test"
DAV = {"url": "https://dav.example.com/{email}/calendar/"}

playwright_api = pytest.importorskip("playwright.async_api")


def _need_chromium() -> None:
    if CHROMIUM.is_file():
        return
    message = "Debian's chromium is not installed (scripts/test.sh installs it as root)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@contextlib.asynccontextmanager
async def live_worker(settings: Settings, calendars: Calendars) -> AsyncIterator[str]:
    """`run_worker` as `absence-sync run` runs it; yields the page's base URL."""
    assert settings.kafka_bootstrap_servers and settings.database_url
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(
        settings, Endpoints(settings.kafka_bootstrap_servers, settings.database_url),
        stop=stop, metrics=Metrics(), provider_factory=calendars.provider,
        on_started=started.set_result,
    ))
    done, _ = await asyncio.wait([started, task], timeout=60,
                                 return_when=asyncio.FIRST_COMPLETED)
    assert started in done, "the worker did not start"
    try:
        yield f"http://127.0.0.1:{started.result()}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def shot(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / f"{name}.png"


def publish_docs_screenshots() -> None:
    if os.environ.get("ABSENCE_SYNC_DOCS_SCREENSHOTS") != "1":
        return
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    for png in ARTIFACTS.glob("*.png"):
        shutil.copyfile(png, DOCS_IMAGES / png.name)


async def test_sign_in_see_the_cause_retry_and_resync(
    settings: Settings, pool: asyncpg.Pool, publisher: Publisher
) -> None:
    _need_chromium()
    settings = settings.model_copy(update={"ms_client_id": "11111111-2222-3333-4444-555555555555"})
    calendars = Calendars(settings, unknown={GHOST})
    await store.apply_configs(pool, [
        SyncConfig(id="acme-o365", tenant="acme", provider="microsoft365"),
        SyncConfig(id="acme-cal", tenant="acme", provider="caldav", provider_settings=DAV,
                   establishments=["paris"]),
    ], SecretBox(None))
    people = ["jane@acme.test", "john@acme.test", "joe@acme.test", GHOST]
    for n, email in enumerate(people):
        await publisher.send(absence(f"a{n}", email, end=f"2026-12-0{n + 3}",
                                     display_name=email.split("@")[0].title()))
    await publisher.flush()
    token = await new_token(pool, "acme", "configure", "browser test")

    async def written() -> bool:
        n = await pool.fetchval("SELECT count(*) FROM sync_items WHERE done_seq > 0")
        return bool(n == 2 * len(people)) and await idle(pool)

    async with live_worker(settings, calendars) as base, \
            playwright_api.async_playwright() as pw:
        await wait_until(written, timeout=60)
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1100, "height": 900})
            context.set_default_timeout(30_000)  # a loaded machine: generous, never a sleep
            page = await context.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            expect = playwright_api.expect
            expect.set_options(timeout=20_000)

            # sign in, with the keyboard
            await page.goto(base + "/")
            await page.keyboard.press("Tab")
            assert await page.evaluate("document.activeElement.className") == "skip"
            await page.screenshot(path=shot("01-sign-in"))
            await page.get_by_label("API token").fill(token)
            await page.get_by_label("API token").press("Enter")

            # the list: the failing configuration and its cause, the degraded one
            o365 = page.locator("li.card", has_text="acme-o365")
            await expect(o365.locator(".badge")).to_have_text("Failing")
            await expect(o365).to_contain_text("An administrator must grant consent")
            consent = o365.get_by_role("link", name="Grant consent in Microsoft 365")
            href = await consent.get_attribute("href") or ""
            assert href.startswith(
                "https://login.microsoftonline.com/organizations/v2.0/adminconsent?")
            assert "consent%2Fmicrosoft365%2Fcallback" in href
            cal = page.locator("li.card", has_text="acme-cal")
            await expect(cal.locator(".badge")).to_have_text("Degraded")
            await expect(cal).to_contain_text(f"check these employees' e-mail addresses: {GHOST}")
            await page.screenshot(path=shot("02-synchronizations"), full_page=True)

            # the failing configuration: each failed absence with code, message and hint
            await page.get_by_role("link", name="acme-o365").click()
            rows = page.locator("table.items tbody tr")
            await expect(rows).to_have_count(4)
            await expect(rows.first).to_contain_text("consent_missing")
            await expect(rows.first).to_contain_text("absence-sync consent-url acme-o365")
            await page.screenshot(path=shot("03-failing-configuration"), full_page=True)

            # retry: re-queued, and (no consent yet) failed again
            await page.get_by_role("button", name="Retry failed absences").click()
            await expect(page.get_by_role("status").first).to_contain_text(
                "Re-queued 4 failed absence(s)")

            async def failed_again() -> bool:
                return bool(await pool.fetchval(
                    "SELECT count(*) FROM sync_items WHERE config_id = 'acme-o365'"
                    " AND status = 'failed' AND change_seq = done_seq") == 4)

            await wait_until(failed_again, timeout=30)

            # test the connection (configure role): the probe's code and hint, in place
            await page.get_by_label("Mailbox (optional)").fill("jane@acme.test")
            await page.get_by_role("button", name="Test connection").click()
            result = page.locator("#test-result")
            await expect(result.locator("code")).to_have_text("consent_missing")
            await expect(result).to_contain_text("consent-url acme-o365")
            await expect(page.get_by_role("button", name="Test connection")).to_be_enabled()
            await page.locator("section", has=page.locator("#test-title")).screenshot(
                path=shot("07-test-connection"))

            # synchronize from a date: the count first, then a job and its progress bar
            await page.goto(base + "/ui/syncs/acme-cal")
            await page.get_by_label("Absences ending on or after").fill("2026-12-04")
            await page.get_by_role("button", name="Count events").click()
            start = page.get_by_role("button", name="Initialize 3 events")
            await expect(start).to_be_visible()
            await expect(start).to_be_focused()
            await page.screenshot(path=shot("04-initialize-events"), full_page=True)
            before = len(calendars.memory.calls)
            assert before > 0
            await start.click()
            status = page.locator("#resync-status")
            await expect(status).to_contain_text("Done:", timeout=30_000)
            await expect(status).to_have_text("Done: 0 written, 2 unchanged, 1 failed.")
            bar = page.locator("#resync-progress")
            assert await bar.get_attribute("max") == "3"
            assert await bar.evaluate("b => b.value") == 3
            await page.screenshot(path=shot("05-resync-done"), full_page=True)

            # the settings form (configure role): a new label reaches the calendars
            await page.get_by_label("Label shown when hidden").fill("Away")
            await page.get_by_role("button", name="Save settings").click()
            await expect(page.get_by_text("Settings saved.")).to_be_visible()

            async def relabelled() -> bool:
                subjects = {e.event.subject for e in calendars.memory.all()}
                return subjects == {"Away"}

            await wait_until(relabelled, timeout=30)

            # every visible form field has a label
            unlabelled = await page.evaluate("""() => [...document.querySelectorAll(
                'input:not([type=hidden]), select, textarea')].filter(
                el => !(el.labels && el.labels.length)).map(el => el.name)""")
            assert unlabelled == []

            # readable on a phone
            phone = await browser.new_context(viewport={"width": 375, "height": 740},
                                              is_mobile=True, has_touch=True)
            await phone.add_cookies(await context.cookies())
            mobile = await phone.new_page()
            await mobile.goto(base + "/ui/syncs/acme-o365")
            width = await mobile.evaluate("document.documentElement.scrollWidth")
            assert width <= 375, f"the page scrolls sideways on a phone ({width}px)"
            await mobile.screenshot(path=shot("06-phone"))
            await phone.close()
            assert problems == []
        finally:
            await browser.close()
    publish_docs_screenshots()
