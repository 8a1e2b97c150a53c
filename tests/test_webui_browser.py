"""A real browser (Playwright driving Debian's chromium) launches a pocket SPO job from the page with one
click, sees progress and a sample image appear, and screenshots every tab.

Needs `playwright` (the Python package; its own browser download is not used) and /usr/bin/chromium
(Debian's `chromium` package); skipped without them. Screenshots go to the test's tmp folder, and
also to $SPO_STUDIO_SCREENSHOTS when set (`SPO_STUDIO_SCREENSHOTS=docs pytest -m browser` refreshes
docs/studio_*.png)."""

import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import test_jobs
import yaml
from test_jobs import tiny_values

pytestmark = pytest.mark.browser
CHROMIUM = os.environ.get("SPO_STUDIO_CHROMIUM", "/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package", allow_module_level=True)
expect = playwright_api.expect

job_spm, pocket_prompts = test_jobs.job_spm, test_jobs.pocket_prompts  # shared fixtures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory, job_spm, pocket_prompts):
    """The page, whose preselected pocket preset is test-sized, so one click trains in seconds."""
    from spo_studio.webui.app import Studio, build_app, launch

    configs = tmp_path_factory.mktemp("configs")
    preset = {"method": "spo", **tiny_values(job_spm, pocket_prompts, epochs=3, num_steps=6, divert_start_step=2)}
    (configs / "pocket_spo.yaml").write_text(yaml.safe_dump(preset))
    with pytest.MonkeyPatch.context() as mp:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            mp.setenv(var, "1")
        mp.setenv("TQDM_DISABLE", "1")
        studio = Studio(runs_dir=tmp_path_factory.mktemp("browser") / "runs", configs_dir=configs, devices=["cpu"],
                        inspector_device="cpu", refresh_seconds=1.0)
        demo = build_app(studio)
        _, url, _ = launch(demo, studio, port=_free_port(), prevent_thread_lock=True, quiet=True)
        yield url
        demo.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                    "--disable-dev-shm-usage"])
        yield b
        b.close()


def _shot(page, tmp_path, name: str) -> Path:
    out = tmp_path / f"studio_{name}.png"
    page.screenshot(path=str(out), full_page=True)
    target = os.environ.get("SPO_STUDIO_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, Path(target) / out.name)
    return out


def _set_number(page, selector: str, value) -> None:
    box = page.locator(f"{selector} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def _set_custom_dropdown(page, selector: str, value: str) -> None:
    box = page.locator(f"{selector} input").first
    box.fill(value)
    box.press("Enter")


def test_one_click_trains_a_pocket_lora_and_every_tab_renders(browser, page_url, job_spm, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(page_url)
    expect(page.locator("#launch-btn")).to_be_visible()
    expect(page.locator("#preset input").first).to_have_value("pocket_spo.yaml")
    assert _shot(page, tmp_path, "train").stat().st_size > 10_000

    page.locator("#launch-btn").click()  # the one click
    status = page.locator("#job-status")
    expect(status).to_contain_text("running", timeout=90_000)  # the page switched to the Jobs tab
    expect(page.locator("#job-samples img").first).to_be_visible(timeout=120_000)
    expect(status).to_contain_text("finished", timeout=120_000)
    expect(page.locator("#dl-webui")).to_be_enabled(timeout=10_000)
    expect(page.locator("#job-log textarea")).to_have_value(re.compile("writing sd15 LoRA"))
    page.wait_for_timeout(1500)  # let the plots draw
    _shot(page, tmp_path, "jobs")

    page.get_by_role("tab", name="Step inspector").click()
    if job_spm != "pocket":
        _set_custom_dropdown(page, "#inspect-spm", job_spm)
    _set_number(page, "#inspect-steps", 10)
    page.locator("#inspect-loras input").first.click()  # base vs the job's LoRA, overlaid
    page.get_by_role("option", name="(webui)").first.click()
    page.keyboard.press("Escape")
    page.locator("#inspect-btn").click()
    expect(page.locator("#inspect-x0 img").first).to_be_visible(timeout=60_000)
    expect(page.locator("#inspect-summary")).to_contain_text("spo_lora_webui")
    page.wait_for_timeout(1000)
    _shot(page, tmp_path, "inspector")

    page.get_by_role("tab", name="Pool explorer").click()
    if job_spm != "pocket":
        _set_custom_dropdown(page, "#pool-spm", job_spm)
    _set_number(page, "#pool-steps", 10)
    _set_number(page, "#pool-step", 5)
    page.locator("#pool-btn").click()
    expect(page.locator("#pool-summary")).to_contain_text("Winner", timeout=60_000)
    expect(page.locator("#pool-gallery img").first).to_be_visible()
    page.wait_for_timeout(1000)
    _shot(page, tmp_path, "pool")

    page.get_by_role("tab", name="LoRA tools").click()
    page.locator("#lora-pick input").first.click()
    page.get_by_role("option", name="(webui)").first.click()
    page.locator("#lora-info-btn").click()
    expect(page.locator("#lora-info")).to_contain_text("webui", timeout=30_000)
    _shot(page, tmp_path, "lora")
    page.close()
