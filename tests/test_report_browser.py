"""The headless-Chromium page check (tests/helpers/browser.py) that the interpretability reports go through
(tests/test_interpret.py): on crafted pages it passes a clean one and names each planted fault of a broken one."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from experiments.interpretability.report import ReportItem, write_report


@pytest.mark.slow
def test_chromium_check_names_a_missing_image_a_corrupt_one_and_a_console_error(tmp_path, open_in_chromium):
    Image.new("RGB", (5, 3), "red").save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    clean = write_report(tmp_path, "clean", [ReportItem("figures", figures=["good.png"])], {"checkpoint": "c.ckpt"})
    check = open_in_chromium(clean)
    assert check.problems() == [] and check.img_tags == 1
    assert [(i["src"], i["width"], i["height"]) for i in check.images] == [("good.png", 5, 3)]

    # the report's page with one image moved away after writing, one corrupt and a script logging an error
    (tmp_path / "moved.png").write_bytes((tmp_path / "good.png").read_bytes())
    items = [ReportItem("figures", figures=["good.png", "moved.png", "corrupt.png"])]
    broken = write_report(tmp_path, "broken", items, {})
    (tmp_path / "moved.png").unlink()
    page = broken.read_text().replace("</body>", "<script>console.error('planted error')</script></body>")
    broken.write_text(page)
    problems = open_in_chromium(broken).problems()
    assert "image did not load: moved.png" in problems and "image did not load: corrupt.png" in problems
    assert "image did not load: good.png" not in problems
    assert "console error: planted error" in problems
    assert any(p.startswith("request failed: ") and p.endswith("moved.png: net::ERR_FILE_NOT_FOUND")
               for p in problems), problems


def test_img_tags_are_counted_from_the_file_itself():
    from tests.helpers.browser import count_img_tags

    assert count_img_tags("<p><img src='a.png'><IMG SRC=b.png /><a href='img.png'>img</a></p><!-- <img> -->") == 2


def test_a_missing_chromium_names_ci_run(monkeypatch):
    from tests.helpers import browser

    monkeypatch.setenv("PATH", str(Path("/nonexistent")))
    with pytest.raises(browser.BrowserError, match=r"\.ci/run.*apt-get install -y --no-install-recommends chromium"):
        browser.check_page(Path(__file__))
