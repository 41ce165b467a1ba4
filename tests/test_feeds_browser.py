"""Feed links on the administration page, in a real headless Chromium against a live
worker (real intake, dispatcher and the `ics` provider): a manage user creates a
link, copies it once, a calendar client fetches it, the user revokes it."""

from __future__ import annotations

import aiohttp
import asyncpg
import icalendar

from consumer import store
from consumer.config import SyncConfig
from consumer.providers import build_provider
from consumer.providers.base import Provider, ProviderContext
from consumer.secrets import SecretBox
from consumer.settings import Settings
from tests.admin_world import Calendars, absence, idle, new_token
from tests.conftest import Publisher, wait_until
from tests.test_page_browser import CHROMIUM, CHROMIUM_ARGS, _need_chromium, live_worker, shot
from tests.test_page_browser import playwright_api as pw_api


class RealProviders(Calendars):
    def provider(self, stored: store.StoredConfig) -> Provider:
        return build_provider(stored.config, ProviderContext(self.settings))


async def test_manage_user_creates_copies_and_revokes_a_feed_link(
    settings: Settings, pool: asyncpg.Pool, publisher: Publisher
) -> None:
    _need_chromium()
    await store.apply_configs(pool, [
        SyncConfig(id="acme-feed", tenant="acme", provider="ics", category="Absence"),
    ], SecretBox(None))
    await publisher.send(absence("a1", "jane@acme.test", display_name="Jane"))
    await publisher.send(absence("a2", "john@acme.test", display_name="John"))
    await publisher.flush()
    token = await new_token(pool, "acme", "manage", "browser test")

    async def settled() -> bool:
        synced = await pool.fetchval("SELECT count(*) FROM sync_items WHERE status = 'synced'")
        return bool(synced == 2) and await idle(pool)

    async with live_worker(settings, RealProviders(settings)) as base, \
            pw_api.async_playwright() as pw, aiohttp.ClientSession() as http:
        await wait_until(settled, timeout=60)
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1100, "height": 900})
            context.set_default_timeout(30_000)
            page = await context.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            expect = pw_api.expect
            expect.set_options(timeout=20_000)

            await page.goto(base + "/")
            await page.get_by_label("API token").fill(token)
            await page.get_by_label("API token").press("Enter")
            await page.get_by_role("link", name="acme-feed").click()
            await expect(page.get_by_role("heading", name="Feed links")).to_be_visible()
            await expect(page.get_by_text("No feed link yet.")).to_be_visible()

            await page.get_by_label("Employee e-mail").fill("jane@acme.test")
            await page.get_by_role("button", name="Create feed link").click()
            link = page.get_by_role("textbox", name="Feed link")
            await expect(link).to_be_visible()
            url = await link.input_value()
            assert url.startswith(base + "/feeds/absfeed_") and url.endswith(".ics")
            await page.screenshot(path=shot("07-feed-link"), full_page=True)

            unlabelled = await page.evaluate("""() => [...document.querySelectorAll(
                'input:not([type=hidden]), select, textarea')].filter(
                el => !(el.labels && el.labels.length)).map(el => el.name || el.id)""")
            assert unlabelled == []

            # what a calendar client gets
            async with http.get(url) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/calendar")
                calendar = icalendar.Calendar.from_ical(await response.text())
            assert [str(e["SUMMARY"]) for e in calendar.walk("VEVENT")] == ["Absent"]

            # the link is shown once: not after a reload
            await page.goto(base + "/ui/syncs/acme-feed")
            assert url not in await page.content()
            row = page.locator("table.feeds tbody tr", has_text="jane@acme.test")
            await expect(row).to_have_count(1)
            await row.get_by_role("button", name="Revoke").click()
            await expect(page.get_by_role("status").first).to_contain_text("revoked")
            await expect(page.locator("table.feeds tbody tr").first).to_contain_text("revoked")
            async with http.get(url) as response:
                assert response.status == 404
            assert problems == []
        finally:
            await browser.close()
