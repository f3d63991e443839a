"""`show --html`: the static gallery, checked in a real browser (Chromium through selenium).

The job output is real: the shard worker writes it in-process (two workers, so the
throughput plot has two lines) with the fake pipeline, then `finalize` writes the
manifest and errors.parquet. Expected values come from reading that output with pyarrow,
never from the gallery's own files.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FakePipeline
from PIL import Image

from ldm_jobs import open_output
from ldm_jobs.jobs import sinks
from ldm_jobs.jobs.cli import main
from ldm_jobs.jobs.gallery import GalleryError, write_gallery
from ldm_jobs.jobs.gallery.index import GroupBuilder, ShardCache
from ldm_jobs.jobs.gallery.plots import NO_TIMES, throughput_plot
from ldm_jobs.jobs.plan import make_plan
from ldm_jobs.jobs.spec import parse_spec
from ldm_jobs.jobs.worker import ShardWorker

ROWS = 310  # 300 images, 10 rejected rows under two reasons
SUBJECTS, COLOURS, STYLES = ["cube", "ball", "tree", "house", "cat"], ["red", "green", "blue"], \
    ["oil", "photo", "sketch"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,900"]


def make_input(path: Path, rows: int = ROWS) -> Path:
    prompts = [f"a {COLOURS[i % 3]} {SUBJECTS[i % 5]} number {i}" for i in range(rows)]
    for i in range(0, rows, 60):
        prompts[i] = ""  # rejected: "prompt: empty"
    for i in range(7, rows, 100):
        prompts[i] = f"REFUSE {i}"  # rejected by the pipeline: "generation: ..."
    table = pa.table({
        "id": [f"r{i:04d}" for i in range(rows)], "prompt": prompts,
        "sampler": [["euler", "ddim"][i % 2] for i in range(rows)],
        "guidance_scale": [[3.0, 7.5][i % 2] for i in range(rows)],
        "style": [STYLES[i % 3] for i in range(rows)],
    })
    pq.write_table(table, path)
    return path


def job_spec(input_path, output_path, rows_per_shard: int = 64, **output):
    return parse_spec({"name": "gallery-test", "model": "builtin:tiny-random",
                       "input": {"path": str(input_path)},
                       "output": {"path": str(output_path), "rows_per_shard": rows_per_shard,
                                  **output},
                       "sampling": {"width": 32, "height": 32, "steps": 1}})


def run_shards(spec, count: int | None = None, finalize: bool = True):
    """Run the pending shards (the first `count` of them) on two in-process workers."""
    plan = make_plan(spec)
    pipeline = FakePipeline()
    workers = [ShardWorker(spec, pipeline=pipeline, worker_id=f"w{i}") for i in range(2)]
    for number, shard in enumerate(plan.pending()[:count]):
        workers[number % 2].run(shard)
    for worker in workers:
        worker.close()
    if finalize:
        sinks.finalize(spec, make_plan(spec), wall_seconds=1.0)


def output_rows(folder: Path) -> list[dict]:
    """The output's image rows in shard order, without the image bytes."""
    rows = []
    for path in sorted(folder.glob("part-*.parquet")):
        rows += pq.read_table(path).drop_columns(["image"]).to_pylist()
    return rows


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery-job")
    spec = job_spec(make_input(root / "in.parquet"), root / "out")
    run_shards(spec)
    return root


@pytest.fixture(scope="module")
def site(job):
    assert main(["show", str(job / "out"), "--html", str(job / "site")]) == 0
    return job / "site"


# ---- the browser ---------------------------------------------------------------------------

def _chromium() -> tuple[str, str]:
    binary = next((shutil.which(name) for name in ("chromium", "chromium-browser")
                   if shutil.which(name)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install "
                    "chromium chromium-driver; `make test` tries that): the gallery's browser "
                    "tests cannot run")
    return binary, driver


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (pip install -e .[test])")
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="gallery-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser, site, tmp_path):
    """The browser, with a check after each test that the console logged no error."""
    browser.get_log("browser")  # start clean
    yield browser
    browser.save_screenshot(str(tmp_path / "last.png"))
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors


def wait_for(driver, condition, what: str, timeout: float = 30.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d), message=what)


def open_view(driver, site: Path, fragment: str = "") -> None:
    driver.get((site / "index.html").as_uri() + fragment)


def grid_ids(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#grid .caption b'), b => b.textContent)")


def rendered(driver, page_number: int, results: int | None = None) -> bool:
    body = driver.find_element("tag name", "body")
    return (body.get_attribute("data-page") == str(page_number)
            and (results is None or body.get_attribute("data-results") == str(results)))


def test_pages_of_thumbnails(page, site, job, tmp_path):
    from selenium.webdriver.common.by import By

    rows = output_rows(job / "out")
    assert len(rows) == 300
    open_view(page, site)
    wait_for(page, lambda d: rendered(d, 1, 300), "page 1 rendered")
    assert grid_ids(page) == [row["id"] for row in rows[:100]]
    images = page.find_elements(By.CSS_SELECTOR, "#grid img")
    assert [image.get_attribute("alt") for image in images] == [r["prompt"] for r in rows[:100]]
    wait_for(page, lambda d: d.execute_script(
        "const shown = Array.from(document.images).filter("
        "  i => i.getBoundingClientRect().top < innerHeight);"
        "return shown.length > 0 && shown.every(i => i.complete && i.naturalWidth > 0)"),
        "the thumbnails in view decoded (the others load lazily, as they scroll in)")
    page.save_screenshot(str(tmp_path / "page1.png"))

    page.find_element(By.CSS_SELECTOR, ".pager a[rel=next]").click()
    wait_for(page, lambda d: rendered(d, 2), "page 2 rendered")
    assert grid_ids(page) == [row["id"] for row in rows[100:200]]
    page.save_screenshot(str(tmp_path / "page2.png"))

    # The keyboard turns pages too; the last page holds the rest.
    page.find_element(By.CSS_SELECTOR, "#grid a.thumb").send_keys("\ue00f")  # PageDown
    wait_for(page, lambda d: rendered(d, 3), "page 3 rendered")
    assert grid_ids(page) == [row["id"] for row in rows[200:300]]

    # A thumbnail is WebP, at most 256 on its long side, and shows its row's image.
    source = next(job.glob("out/part-00000.parquet"))
    first = pq.read_table(source).slice(0, 1).to_pylist()[0]
    thumb = Image.open(site / "thumbs" / "part-00000" / "000000.webp")
    assert thumb.format == "WEBP" and max(thumb.size) <= 256
    original = Image.open(io.BytesIO(first["image"])).convert("RGB")
    assert thumb.size == original.size  # 32x32 is kept as it is, never enlarged
    assert thumb.convert("RGB").getpixel((24, 24)) == pytest.approx(
        original.getpixel((24, 24)), abs=12)


def test_search_and_filters(page, site, job, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    rows = output_rows(job / "out")
    open_view(page, site)
    wait_for(page, lambda d: rendered(d, 1, 300), "page 1 rendered")
    box = page.find_element(By.ID, "q")
    box.send_keys("Red  CUBE\n")
    expected = [r["id"] for r in rows if "red" in r["prompt"].lower()
                and "cube" in r["prompt"].lower()]
    assert 0 < len(expected) < 100
    wait_for(page, lambda d: rendered(d, 1, len(expected)), "search results")
    assert grid_ids(page) == expected
    page.save_screenshot(str(tmp_path / "search.png"))

    # A filter on a metadata column narrows the same search.
    Select(page.find_element(By.CSS_SELECTOR, "select[data-column=style]")).select_by_value(
        '"oil"')
    expected = [r["id"] for r in rows if "red" in r["prompt"] and "cube" in r["prompt"]
                and r["style"] == "oil"]
    wait_for(page, lambda d: rendered(d, 1, len(expected)), "search and filter results")
    assert grid_ids(page) == expected

    # Filters alone, over every row: guidance 7.5, paged like the full list.
    page.find_element(By.ID, "clear").click()
    wait_for(page, lambda d: rendered(d, 1, 300), "cleared")
    Select(page.find_element(By.CSS_SELECTOR, "select[data-column=guidance_scale]")) \
        .select_by_value("7.5")
    expected = [r["id"] for r in rows if r["guidance_scale"] == 7.5]
    wait_for(page, lambda d: rendered(d, 1, len(expected)), "filter results")
    assert grid_ids(page) == expected[:100]


def test_detail_of_an_image(page, site, job, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    rows = output_rows(job / "out")
    open_view(page, site, "#page=2")
    wait_for(page, lambda d: rendered(d, 2), "page 2 rendered")
    first = page.find_element(By.CSS_SELECTOR, "#grid a.thumb")
    first.send_keys(Keys.ARROW_RIGHT)  # the keyboard moves through the grid
    focused = page.switch_to.active_element
    assert focused.get_attribute("data-index") == "101"
    focused.send_keys(Keys.ENTER)
    detail = page.find_element(By.ID, "detail")
    wait_for(page, lambda d: detail.is_displayed()
             and d.find_element(By.ID, "detail-title").text == rows[101]["id"], "detail shown")
    fields = {th.text: td.text for th, td in zip(
        page.find_elements(By.CSS_SELECTOR, "#detail-fields th"),
        page.find_elements(By.CSS_SELECTOR, "#detail-fields td"))}
    row = rows[101]
    for name in ("prompt", "sampler", "style", "model", "seed", "steps", "width"):
        assert fields[name] == str(row[name]), name
    assert float(fields["guidance_scale"]) == row["guidance_scale"]
    shard_link = page.find_element(By.CSS_SELECTOR, "#detail-fields a")
    target = Path(unquote(urlparse(urljoin(page.current_url, shard_link.get_attribute("href")))
                          .path))
    assert target.resolve() == (job / "out" / "part-00001.parquet").resolve()
    shard_rows = pq.read_table(target).column("id").to_pylist()
    position = int(fields["shard, row"].rsplit("row ", 1)[1])
    assert shard_rows[position] == row["id"]
    image = page.find_element(By.CSS_SELECTOR, "#detail-figure img")
    wait_for(page, lambda d: d.execute_script("return arguments[0].naturalWidth", image) == 32,
             "full image loaded")
    assert image.get_attribute("alt") == row["prompt"]
    page.save_screenshot(str(tmp_path / "detail.png"))

    # Tab stays inside the open dialog: from its last control back to its first.
    page.find_element(By.CSS_SELECTOR, "#detail-fields a").send_keys(Keys.TAB)
    assert page.switch_to.active_element.get_attribute("id") == "detail-prev"
    page.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    wait_for(page, lambda d: d.find_element(By.ID, "detail-title").text == rows[102]["id"],
             "next image")
    page.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait_for(page, lambda d: not detail.is_displayed(), "detail closed")


def test_detail_with_thumbnails_only(page, job, tmp_path):
    from selenium.webdriver.common.by import By

    site = tmp_path / "thumbs-only"
    assert main(["show", str(job / "out"), "--html", str(site), "--full-images", "none"]) == 0
    assert not (site / "images").exists()
    rows = output_rows(job / "out")
    first_shard = len(pq.read_table(job / "out" / "part-00000.parquet"))
    item = first_shard + 6  # the 7th image of the second shard
    open_view(page, site, f"#item={item}")
    wait_for(page, lambda d: d.find_element(By.ID, "detail").is_displayed()
             and d.find_element(By.ID, "detail-title").text == rows[item]["id"], "detail shown")
    image = page.find_element(By.CSS_SELECTOR, "#detail-figure img")
    wait_for(page, lambda d: d.execute_script("return arguments[0].naturalWidth", image) == 32,
             "the thumbnail loaded")
    assert image.get_attribute("src").endswith("/thumbs/part-00001/000006.webp")
    note = page.find_element(By.ID, "detail-thumb-note").text
    assert "row 6 of part-00001.parquet" in note
    assert pq.read_table(job / "out" / "part-00001.parquet").column("id")[6].as_py() == rows[item]["id"]


def test_rejected_rows_by_reason(page, site, job, tmp_path):
    from selenium.webdriver.common.by import By

    errors = pq.read_table(job / "out" / "errors.parquet").to_pylist()
    by_reason: dict[str, set[str]] = {}
    for row in errors:
        by_reason.setdefault(row["reason"], set()).add(row["id"])
    assert len(errors) == 10 and len(by_reason) == 2
    open_view(page, site, "#view=errors")
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "details.reason"), "errors listed")
    shown = {}
    for details in page.find_elements(By.CSS_SELECTOR, "details.reason"):
        reason = details.find_element(By.CSS_SELECTOR, "summary .text").text
        count = int(details.find_element(By.CSS_SELECTOR, "summary .count").text)
        ids = {cell.text for cell in details.find_elements(By.CSS_SELECTOR, "tbody td:first-child")}
        assert count == len(ids)
        shown[reason] = ids
    assert shown == by_reason
    page.save_screenshot(str(tmp_path / "errors.png"))


def test_job_story_plots(page, site, job, tmp_path):
    from selenium.webdriver.common.by import By

    # What the plots read: each shard's record says when it started and finished.
    for path in (job / "out" / "_shards").glob("part-*.json"):
        record = json.loads(path.read_text())
        took = record["finished_at"] - record["started_at"]
        assert record["worker"] in ("w0", "w1")
        assert took == pytest.approx(record["busy_seconds"], abs=0.002)

    open_view(page, site, "#view=story")
    charts = page.find_elements(By.CSS_SELECTOR, "#view-story figure.chart")
    assert [c.find_element(By.TAG_NAME, "figcaption").text for c in charts] == [
        "Images per second over time, per worker", "Shard durations", "Rows by outcome"]
    assert len(charts[0].find_elements(By.TAG_NAME, "polyline")) == 2  # workers w0 and w1
    assert len(charts[1].find_elements(By.TAG_NAME, "circle")) == 5  # one per shard
    outcome = charts[2].text
    assert "300" in outcome and "10" in outcome
    page.save_screenshot(str(tmp_path / "story.png"))


def test_site_is_self_contained(site):
    """No external script, style, font or fetch(): the page works offline, from disk."""
    texts = [(site / "index.html").read_text(), (site / "assets" / "gallery.js").read_text(),
             (site / "assets" / "gallery.css").read_text()]
    for text in texts:
        assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert "https://" not in text and "fetch(" not in text and "@import" not in text
    assert (site / "data" / "group-00000.js").read_text().startswith("GALLERY_GROUP(")


def test_page_loads_only_its_own_files(page, site):
    from selenium.webdriver.common.by import By

    open_view(page, site, "#view=story")
    page.find_element(By.ID, "tab-images").click()
    wait_for(page, lambda d: rendered(d, 1, 300), "page 1 rendered")
    page.find_element(By.CSS_SELECTOR, "#grid a.thumb").click()
    wait_for(page, lambda d: d.find_element(By.ID, "detail").is_displayed(), "detail shown")
    loaded = page.execute_script(
        "return Array.from(document.querySelectorAll('[src], link[href]'),"
        " node => node.src || node.href)")
    assert len(loaded) > 100  # scripts, the style sheet, 100 thumbnails, the full image
    outside = [name for name in loaded
               if not name.startswith(site.as_uri() + "/") and name != "data:,"]  # no favicon
    assert outside == []


# ---- incremental runs and object storage -----------------------------------------------------

def test_rerun_thumbnails_only_new_shards(tmp_path):
    spec = job_spec(make_input(tmp_path / "in.parquet", rows=120), tmp_path / "out",
                    rows_per_shard=32)
    run_shards(spec, count=2, finalize=False)  # a job still running: 2 of 4 shards
    first = write_gallery(str(tmp_path / "out"), str(tmp_path / "site"))
    assert (first.shards, first.new_shards) == (2, 2)
    old_thumb = tmp_path / "site" / "thumbs" / "part-00000" / "000000.webp"
    stamp = old_thumb.stat().st_mtime_ns
    time.sleep(0.01)
    run_shards(spec)  # the job resumes and finishes
    second = write_gallery(str(tmp_path / "out"), str(tmp_path / "site"))
    assert (second.shards, second.new_shards) == (4, 2)
    assert old_thumb.stat().st_mtime_ns == stamp  # not made again
    rows = output_rows(tmp_path / "out")
    assert second.rows == len(rows)
    summary = _summary(tmp_path / "site")
    assert summary["rows"] == len(rows) and summary["pending"] == 0
    for row_number in range(len(pq.read_table(tmp_path / "out" / "part-00003.parquet"))):
        assert (tmp_path / "site" / "thumbs" / "part-00003" / f"{row_number:06d}.webp").exists()
    third = write_gallery(str(tmp_path / "out"), str(tmp_path / "site"))
    assert third.new_shards == 0


def test_full_images_copy_webp_or_none(tmp_path):
    """What the detail view shows decides what the site stores; switching redoes the
    shards and leaves no file of the old form behind."""
    spec = job_spec(make_input(tmp_path / "in.parquet", rows=40), tmp_path / "out",
                    rows_per_shard=16)
    run_shards(spec)
    out, site = tmp_path / "out", tmp_path / "site"
    originals = {(path.stem, row): data for path in sorted(out.glob("part-*.parquet"))
                 for row, data in enumerate(pq.read_table(path).column("image").to_pylist())}

    def files(kind: str) -> list[Path]:
        return sorted(p.relative_to(site / kind) for p in (site / kind).rglob("*") if p.is_file())

    write_gallery(str(out), str(site))  # copy, the default: the images' own bytes
    assert {(p.parent.name, int(p.stem)): (site / "images" / p).read_bytes()
            for p in files("images")} == originals

    assert main(["show", str(out), "--html", str(site), "--full-images", "webp"]) == 0
    assert files("images") == [Path(shard, f"{row:06d}.webp") for shard, row in sorted(originals)]
    for (shard, row), data in originals.items():
        with Image.open(site / "images" / shard / f"{row:06d}.webp") as webp, \
                Image.open(io.BytesIO(data)) as original:
            assert webp.format == "WEBP" and webp.size == original.size
            difference = np.abs(np.asarray(webp.convert("RGB"), dtype=int)
                                - np.asarray(original.convert("RGB"), dtype=int))
            assert difference.mean() < 4, (shard, row)
    assert _summary(site)["full_images"] == "webp"

    none = write_gallery(str(out), str(site), full_images="none")
    assert none.new_shards == none.shards == 3 and files("images") == []
    assert len(files("thumbs")) == len(originals)
    assert _summary(site)["full_images"] == "none"
    assert write_gallery(str(out), str(site), full_images="none").new_shards == 0
    with pytest.raises(GalleryError, match="full_images='png'"):
        write_gallery(str(out), str(site), full_images="png")


def test_webdataset_output_with_jpeg_images(tmp_path):
    spec = job_spec(make_input(tmp_path / "in.parquet", rows=40), tmp_path / "out",
                    rows_per_shard=16, format="webdataset", image_format="jpeg")
    run_shards(spec)
    result = write_gallery(str(tmp_path / "out"), str(tmp_path / "site"))
    expected = [row["id"] for row in open_output(str(tmp_path / "out")).iter_images()]
    assert result.rows == len(expected) == 38 and result.shards == 3
    groups = (tmp_path / "site" / "data" / "group-00000.js").read_text()
    content = json.loads(groups[len("GALLERY_GROUP("):-len(");\n")])
    ids = content["columns"]["id"]
    assert (ids if isinstance(ids, list) else [ids["d"][c] for c in ids["c"]]) == expected
    full = sorted((tmp_path / "site" / "images").rglob("*.jpg"))
    assert len(full) == 38 and Image.open(full[0]).format == "JPEG"


def test_a_damaged_shard_is_named(tmp_path, capsys):
    spec = job_spec(make_input(tmp_path / "in.parquet", rows=40), tmp_path / "out",
                    rows_per_shard=16)
    run_shards(spec)
    shard = tmp_path / "out" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])  # a cut-off file: no Parquet footer
    assert main(["show", str(tmp_path / "out"), "--html", str(tmp_path / "site")]) == 1
    assert f"{shard}: cannot read this shard" in capsys.readouterr().err


def _summary(site: Path) -> dict:
    return _summary_from(site.joinpath("index.html").read_text())


def test_gallery_written_back_to_the_bucket(tmp_path, s3_server):
    import boto3

    bucket = s3_server.make_bucket(None)
    output = f"s3://{bucket}/runs/demo"
    spec = job_spec(make_input(tmp_path / "in.parquet", rows=40), output, rows_per_shard=16)
    run_shards(spec)
    assert main(["show", output, "--html", f"{output}/_gallery"]) == 0
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    keys = {item["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="runs/demo/_gallery/") for item in page.get("Contents", [])}
    names = {key.removeprefix("runs/demo/_gallery/") for key in keys}
    assert {"index.html", "assets/gallery.js", "assets/gallery.css", "data/group-00000.js",
            "data/errors.js"} <= names
    ids_by_shard = {}
    for number in range(3):
        key = f"runs/demo/part-{number:05d}.parquet"
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        ids_by_shard[f"part-{number:05d}"] = pq.read_table(io.BytesIO(body)).num_rows
    for shard, count in ids_by_shard.items():
        for row in range(count):
            assert f"thumbs/{shard}/{row:06d}.webp" in names
            assert f"images/{shard}/{row:06d}.png" in names
    html = client.get_object(Bucket=bucket, Key="runs/demo/_gallery/index.html")["Body"].read()
    summary = _summary_from(html.decode())
    assert summary["link"] == ".." and summary["rows"] == sum(ids_by_shard.values())
    again = write_gallery(output, f"{output}/_gallery")
    assert again.new_shards == 0 and again.rows == summary["rows"] and again.note == ""
    # thumbnails only from now on: the bucket loses the copies, keeps the thumbnails
    assert write_gallery(output, f"{output}/_gallery", full_images="none").new_shards == 3
    kept = {item["Key"].removeprefix("runs/demo/_gallery/") for page in client.get_paginator(
        "list_objects_v2").paginate(Bucket=bucket, Prefix="runs/demo/_gallery/")
        for item in page.get("Contents", [])}
    assert not [name for name in kept if name.startswith("images/")]
    assert {name for name in names if name.startswith("thumbs/")} <= kept
    # The output still reads as it did: the site's files are not taken for shards.
    assert open_output(output).parquet_files == [f"{output}/part-{n:05d}.parquet"
                                                 for n in range(3)]


def test_a_site_inside_the_output_gets_a_note(job, tmp_path):
    output = shutil.copytree(job / "out", tmp_path / "out")
    inside = write_gallery(str(output), str(output / "gallery"))
    assert "leading '_'" in inside.note and "gallery" in inside.note
    assert write_gallery(str(output), str(output / "_gallery")).note == ""
    assert write_gallery(str(output), str(tmp_path / "site")).note == ""


def _summary_from(html: str) -> dict:
    marker = '<script type="application/json" id="summary">'
    start = html.index(marker) + len(marker)
    return json.loads(html[start:html.index("</script>", start)])


# ---- the index and the plots, without a browser ----------------------------------------------

def test_groups_cut_across_shards_and_keep_every_value():
    caches = []
    for number, size in enumerate([5, 5, 5]):
        cache = ShardCache(f"part-{number:05d}", f"part-{number:05d}.parquet", "k")
        for row in range(size):
            extra = {"extra": row} if number == 2 and row else {}  # a column from row 11 on
            cache.add({"id": f"{number}-{row}", "sampler": ["euler", "ddim"][row % 2],
                       "loras": [{"name": "a", "weight": 0.5}] if row % 3 else [], **extra})
        cache.ext, cache.image_error = ["png"] * size, [None] * size
        caches.append(cache)
    emitted = []
    builder = GroupBuilder(lambda n, content: emitted.append(content), group_rows=7)
    for cache in caches:
        builder.add(cache)
    facets = builder.finish()
    assert [g["count"] for g in emitted] == [7, 7, 1] == builder.group_sizes

    def decode(column):
        return column if isinstance(column, list) else [column["d"][c] for c in column["c"]]

    ids = [i for g in emitted for i in decode(g["columns"]["id"])]
    assert ids == [f"{n}-{r}" for n in range(3) for r in range(5)]
    extra = [v for g in emitted
             for v in decode(g["columns"].get("extra", [None] * g["count"]))]
    assert extra == [None] * 11 + list(range(1, 5))
    shards = [s for g in emitted for s in decode(g["shard"])]
    assert shards == [f"part-{n:05d}" for n in range(3) for _ in range(5)]
    assert [r for g in emitted for r in g["row"]] == list(range(5)) * 3
    by_column = {facet["column"]: dict(map(tuple, facet["values"])) for facet in facets}
    assert by_column["sampler"] == {"euler": 9, "ddim": 6}
    assert by_column["loras"] == {"a": 9, None: 6}  # a list counts under each element's name
    assert by_column["extra"] == {None: 11, 1: 1, 2: 1, 3: 1, 4: 1}  # rows before it: none
    assert "id" not in by_column


def test_plots_say_when_records_hold_no_times():
    plot = throughput_plot([{"name": "part-00000", "rows": 4, "busy_seconds": 1.0}])
    assert plot.svg == "" and plot.note == NO_TIMES
    records = [{"name": "a", "rows": 10, "worker": "w0", "started_at": 100.0,
                "finished_at": 110.0},
               {"name": "b", "rows": 30, "worker": "w1", "started_at": 100.0,
                "finished_at": 110.0}]
    plot = throughput_plot(records)
    assert plot.svg.count("<polyline") == 2
    assert "40 images in 10.0 s" in plot.note and "4.00 images/s" in plot.note
