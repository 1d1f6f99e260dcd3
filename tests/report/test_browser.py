"""The HTML report in a real headless browser (Debian's chromium and chromedriver, which
`make setup` installs): no console errors, and every view does what it says."""
from __future__ import annotations

import shutil

import pytest

selenium = pytest.importorskip("selenium", reason="selenium is in the dev extras: pip install -e .[dev]")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("chromium and chromedriver are not installed: `make setup` installs them "
                    "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-background-networking"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _open(browser, report, tmp_path, name):
    path = report.write_html(str(tmp_path / f"{name}.html"))
    browser.get("file://" + path)
    assert browser.execute_script("return document.body.dataset.ready") == "1"
    return path


def _severe(browser):
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def _view(browser, name):
    browser.find_element(By.CSS_SELECTOR, f'nav button[data-view="{name}"]').click()


def _rows(browser):
    return browser.find_elements(By.CSS_SELECTOR, "#table tbody tr")


def test_overview_draws_the_plotly_chart_without_console_errors(browser, resnet_report, tmp_path):
    _open(browser, resnet_report, tmp_path, "overview")
    assert browser.find_elements(By.CSS_SELECTOR, "#chart .main-svg")
    bars = browser.find_elements(By.CSS_SELECTOR, "#chart g.trace.bars")
    assert len(bars) == 2                                        # time and weight bytes
    assert _severe(browser) == []


def test_table_has_a_row_per_kernel_sorts_filters_and_rolls_up(browser, resnet_report, tmp_path):
    _open(browser, resnet_report, tmp_path, "table")
    _view(browser, "table")
    data = resnet_report.data
    assert len(_rows(browser)) == len(data["kernels"])
    def first_kernel():
        return _rows(browser)[0].find_elements(By.TAG_NAME, "td")[1].text

    header = browser.find_element(By.CSS_SELECTOR, '#table th[data-key="ms"]')
    assert "sorted-desc" in header.get_attribute("class")
    assert first_kernel() == max(data["kernels"], key=lambda k: k["ms"])["name"]
    header.click()
    assert first_kernel() == min(data["kernels"], key=lambda k: k["ms"])["name"]
    assert "sorted-asc" in browser.find_element(By.CSS_SELECTOR, '#table th[data-key="ms"]').get_attribute("class")
    Select(browser.find_element(By.ID, "filter-op")).select_by_visible_text("Conv")
    assert len(_rows(browser)) == sum(k["op"] == "Conv" for k in data["kernels"])
    Select(browser.find_element(By.ID, "filter-op")).select_by_index(0)
    Select(browser.find_element(By.ID, "table-view")).select_by_value("modules:1")
    assert len(_rows(browser)) == sum(m["depth"] == 1 for m in data["modules"])
    browser.find_element(By.ID, "filter-module").send_keys("blocks")
    assert len(_rows(browser)) == 1
    assert _severe(browser) == []


def test_graph_view_starts_collapsed_and_expands_a_module(browser, resnet_report, tmp_path):
    _open(browser, resnet_report, tmp_path, "graph")
    _view(browser, "graph")
    modules = [e.get_attribute("data-module") for e in browser.find_elements(By.CSS_SELECTOR, "#graph .gitem.module")]
    assert "blocks" in modules and not any(m.startswith("blocks.") for m in modules)
    browser.find_element(By.CSS_SELECTOR, '#graph .gitem.module[data-module="blocks"]').click()
    shown = [e.get_attribute("data-module") for e in browser.find_elements(By.CSS_SELECTOR, "#graph .gitem.module")]
    assert {f"blocks.{i}" for i in range(6)} <= set(shown)
    browser.find_element(By.CSS_SELECTOR, '#graph .gitem.module[data-module="blocks.0"]').click()
    children = [e.get_attribute("data-module") for e in browser.find_elements(By.CSS_SELECTOR, "#graph .gitem.module")]
    assert any(m.startswith("blocks.0.") for m in children)                # its submodules
    nodes = browser.find_elements(By.CSS_SELECTOR, "#graph .gitem.node")
    assert any("(Relu)" in n.text or "(Add)" in n.text for n in nodes)        # and its own nodes
    browser.find_element(By.CSS_SELECTOR, '#graph .gitem.open[data-module="blocks"]').click()
    shown = [e.get_attribute("data-module") for e in browser.find_elements(By.CSS_SELECTOR, "#graph .gitem.module")]
    assert "blocks" in shown and not any(m.startswith("blocks.") for m in shown)
    assert _severe(browser) == []


def test_simulate_panel_shows_predicted_and_measured(browser, resnet_report, tmp_path):
    _open(browser, resnet_report, tmp_path, "simulate")
    _view(browser, "simulate")
    rows = browser.find_elements(By.CSS_SELECTOR, "#simulations tbody tr")
    assert len(rows) == len(resnet_report.data["simulations"]) == 1
    cells = [c.text for c in rows[0].find_elements(By.TAG_NAME, "td")]
    sim = resnet_report.data["simulations"][0]
    assert cells[0] == "prune"
    assert float(cells[3]) == pytest.approx(sim["predicted_ms"], rel=1e-3)
    assert float(cells[4]) == pytest.approx(sim["measured_ms"], rel=1e-3)
    assert cells[5].endswith("%")
    assert _severe(browser) == []


def test_pass_log_lists_every_pass(browser, resnet_report, tmp_path):
    _open(browser, resnet_report, tmp_path, "passes")
    _view(browser, "passes")
    rows = browser.find_elements(By.CSS_SELECTOR, "#passes tbody tr")
    assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == [p["name"] for p in resnet_report.data["passes"]]


def test_failure_report_shows_the_error_and_the_failed_node(browser, failure_report, tmp_path):
    _open(browser, failure_report, tmp_path, "failure")
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and "cummax" in error.text
    assert browser.find_element(By.ID, "view-graph").is_displayed()      # the graph is shown first
    failed = browser.find_elements(By.CSS_SELECTOR, "#graph .gitem.failed")
    assert len(failed) == 1 and "cummax" in failed[0].text
    assert _severe(browser) == []


def test_compare_view_shows_both_sides(browser, resnet_report, tmp_path):
    from graphopt.report.build import Report, compare_layers
    report = Report(dict(resnet_report.data))
    report.data["compare"] = compare_layers(resnet_report, resnet_report)
    _open(browser, report, tmp_path, "compare")
    _view(browser, "compare")
    rows = browser.find_elements(By.CSS_SELECTOR, "#compare-table tbody tr")
    assert len(rows) == len(resnet_report.data["layers"])
    ratios = [r.find_elements(By.TAG_NAME, "td")[3].text for r in rows]
    assert ratios and all(text in ("1.00x", "") for text in ratios) and "1.00x" in ratios
    assert browser.find_elements(By.CSS_SELECTOR, "#compare-chart .main-svg")
    assert _severe(browser) == []
