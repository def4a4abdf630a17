"""The review surface as a reviewer sees it: a real ``mlflow server`` on 127.0.0.1, the small pipeline's model
registered as champion and a challenger registered beside it, and the challenger's model-version page opened in
headless Chromium (Debian's ``chromium``, installed by ``scripts/install_browser.sh``; driven by Playwright). The page
must show the description's metrics table and gate result and the ``challenger`` alias; the plots must be reachable
as run artifacts. A screenshot is saved in the test's temporary folder."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_registry import MlflowServer, client_for, http_config, stage_run_dir, stages, variant

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first test to use it trains the small pipeline

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PLOTS = ("calibration.png", "metrics_vs_champion.png", "training_curves.png")


@pytest.fixture(scope="module")
def browser_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_browser"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reviewed(pipeline_run: Any, browser_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Version 1 (the trained model) promoted to champion; version 2 (a copy with a negligible bias change, so the
    gate has a champion to compare with) registered as the challenger. Returns (config, version 2's result)."""
    from pipeline.promote import promote
    from pipeline.register import register

    first_dir = tmp_path_factory.mktemp("review_v1")
    stage_run_dir(pipeline_run, first_dir)
    cfg = http_config(pipeline_run, first_dir, browser_server, "review")
    register(cfg, *stages(first_dir))
    promote(cfg)
    second_dir = tmp_path_factory.mktemp("review_v2")
    cfg2 = http_config(pipeline_run, second_dir, browser_server, "review")
    second = register(cfg2, *variant(pipeline_run, second_dir, cfg2, "nudge"))
    return cfg2, second


def test_model_version_page_shows_metrics_gate_alias_and_plots(
    reviewed: Any, browser_server: MlflowServer, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    cfg, registered = reviewed
    name, number = registered.model_name, registered.version
    assert client_for(cfg).get_model_version_by_alias(name, "challenger").version == number
    with sync_playwright() as pw:
        # A new profile folder per test (Playwright passes it as --user-data-dir).
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 2000},
        )
        try:
            page = browser.new_page()
            page.goto(f"{browser_server.uri}/#/models/{name}/versions/{number}")
            # The description is rendered Markdown: the metrics table becomes a <table>, the gate result a paragraph.
            page.get_by_text("Promotion gate preview").first.wait_for(timeout=90_000)
            tables = page.locator("table")
            table_text = " ".join(tables.all_inner_texts())
            assert re.search(r"ctr\s+auc", table_text), table_text[:2000]
            assert "this model" in table_text and f"champion v{int(number) - 1}" in table_text
            text = page.inner_text("body")
            assert re.search(r"this model \*?\*?would (pass|be rejected)\*?\*? against the current champion", text), (
                text[:3000]
            )
            assert "ctr.auc" in text, "the gate's checks are listed"
            # The alias is shown by the UI itself (not part of the description text).
            page.get_by_text(re.compile(r"^@?\s*challenger$")).first.wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "model_version.png"), full_page=True)

            # Plots: listed in the run's artifact browser and served as images by the server.
            run = client_for(cfg).get_run(registered.run_id)
            page.goto(f"{browser_server.uri}/#/experiments/{run.info.experiment_id}/runs/{registered.run_id}/artifacts")
            page.get_by_text("plots", exact=True).first.click(timeout=90_000)
            for plot in PLOTS:
                page.get_by_text(plot, exact=True).first.wait_for(timeout=30_000)
                response = page.request.get(
                    f"{browser_server.uri}/get-artifact",
                    params={"path": f"plots/{plot}", "run_uuid": registered.run_id},
                )
                assert response.ok and response.body()[:8] == b"\x89PNG\r\n\x1a\n", plot
            page.screenshot(path=str(tmp_path / "run_artifacts.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "model_version.png").stat().st_size > 10_000
