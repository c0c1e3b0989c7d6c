"""The upload page in a real browser: Debian's Chromium, driven headless through Playwright.

Playwright's own browser download is never used; the system Chromium comes from
`apt-get install -y chromium` (WHATCAR_CHROMIUM points elsewhere). Screenshots go to
WHATCAR_SCREENSHOTS (build/screenshots by default) for a person to look at.
"""

import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.support.paths import ROOT, car_photos

CHROMIUM = Path(os.environ.get("WHATCAR_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = Path(os.environ.get("WHATCAR_SCREENSHOTS", ROOT / "build" / "screenshots"))
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's Chromium with `apt-get install -y chromium` "
                    "(or set WHATCAR_CHROMIUM)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 900, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    # Console errors include Content-Security-Policy violations, which would mean the page
    # breaks its own policy somewhere.
    page.problems = []
    page.on("console", lambda msg: page.problems.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: page.problems.append(str(exc)))
    page.goto(server.url + "/")
    yield page
    context.close()


def shoot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0
    return path


def test_a_photo_gets_the_same_answer_as_predict(page, server, metadata):
    photo = [p for p in car_photos() if p.stem == "047"][0]
    answer = server.predict(photo.read_bytes())
    expected = answer["predictions"]  # the server's default top_k, as the page
    expect(page).to_have_title(re.compile("whatcar"))
    page.set_input_files("#file", str(photo))
    items = page.locator("#results li")
    expect(items).to_have_count(min(5, metadata["num_classes"]))
    assert items.first.locator(".label").text_content() == expected[0]["label"]
    assert [items.nth(i).locator(".label").text_content() for i in range(items.count())] == \
        [p["label"] for p in expected]
    expect(page.locator("#preview")).to_be_visible()
    expect(page.locator("#status")).not_to_have_class(re.compile("error"))
    if answer.get("accepted") is not False:
        expect(page.locator("#results")).not_to_have_class(re.compile("dimmed"))
    if "make" in answer and (answer.get("accepted") is not False or answer.get("accepted_level") == "make"):
        expect(page.locator("#make")).to_have_text(f"Make: {answer['make']['label']} "
                                                   f"({answer['make']['probability'] * 100:.1f} %)")
    # Which model, and which version of it, answered.
    expect(page.locator("#model")).to_contain_text(f"model {metadata['name']} version {metadata['version']}")
    shoot(page, "prediction.png")
    assert page.problems == []


def test_a_text_file_shows_the_servers_message(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("this is a shopping list, not a car\n")
    page.set_input_files("#file", str(notes))
    status = page.locator("#status")
    expect(status).to_have_class(re.compile("error"))
    expect(status).to_contain_text("not an image")
    expect(page.locator("#results li")).to_have_count(0)
    shoot(page, "not-an-image.png")
    # The only console error allowed is the failed request itself (Chromium logs 4xx responses).
    assert all("415" in problem for problem in page.problems), page.problems


def test_a_photo_without_a_car_is_shown_as_not_sure(page, server, metadata):
    """The committed model turns away a photo unlike its car photos, and the page leads with that:
    no make headline, and the closest models follow dimmed."""
    assert metadata["acceptance"]["enabled"], "the committed model should carry acceptance thresholds"
    photo = ROOT / "tests" / "data" / "noncar" / "coffee.jpg"
    answer = server.predict(photo.read_bytes())
    assert answer["accepted"] is False and answer.get("accepted_level") is None
    page.set_input_files("#file", str(photo))
    status = page.locator("#status")
    expect(status).to_have_class(re.compile("unsure"))
    expect(status).to_have_text("Not sure: " + answer["reason"])
    expect(page.locator("#results li")).to_have_count(min(5, metadata["num_classes"]))
    assert page.locator("#results li").first.locator(".label").text_content() == answer["predictions"][0]["label"]
    expect(page.locator("#results")).to_have_class(re.compile("dimmed"))
    expect(page.locator("#make")).to_have_text("")
    shoot(page, "not-sure.png")
    assert page.problems == []


def test_the_known_models_are_listed_and_searchable(page, metadata):
    fields = metadata.get("class_fields")
    names = [c["name"] for c in fields] if fields else metadata["classes"]
    page.locator("#known summary").click()
    expect(page.locator("#known-count")).to_have_text(f"{len(names)} of {len(names)} models")
    expect(page.locator("#known-list li")).to_have_count(len(names))
    # Every word typed must appear, in any order and case: a make and part of a model's name.
    words = names[-1].split()
    query = f"{words[1].upper()} {words[0].lower()}"
    wanted = sorted(n for n in names if all(w.lower() in n.lower() for w in query.split()))
    page.fill("#filter", query)
    expect(page.locator("#known-list li")).to_have_count(len(wanted))
    assert sorted(page.locator("#known-list li").all_text_contents()) == wanted
    shoot(page, "known-models.png")
    assert page.problems == []
