"""The report of a real short run (the bundled SmolLM2, two GRPO steps through LocalBackend), opened in
headless Chromium: no console errors, no request leaves the file, the curves render, clicking a trajectory
shows its messages, and markup inside trajectory text stays text. A hand-written collapsed run checks the
stack under the reward (entropy, drift) and the best-step marker lined up down it.

The browser is Debian's /usr/bin/chromium driven by playwright (`playwright install` is never run: browser
downloads are not possible here). .ci/run installs it; outside CI the test skips when it is absent."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import WEATHER_TOOL

import advantage as adv
from advantage.report import write_report

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=1</script>'
CONTEXT = [
    {"role": "system", "content": "Answer with the tool's result."},
    {"role": "user", "content": f"Weather in Paris? {XSS}"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": "Paris: 5°C, windy"},
]


async def _rollout(model: adv.TrainableModel) -> adv.Trajectory:
    resp = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(),
        messages=CONTEXT,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        max_tokens=8,
        temperature=1.0,
    )
    choice = resp.choices[0]
    reward = (
        float(sum(choice.model_extra["token_ids"]) % 7) / 7
    )  # arbitrary but varied: every group has signal
    return adv.Trajectory(
        [*CONTEXT, choice],
        tools=[WEATHER_TOOL],
        reward=reward,
        metrics={"n_tokens": float(len(choice.model_extra["token_ids"]))},
        logs=[f"RULER (test-judge) score {reward:.3f}: it answered {choice.message.content!r}"],
        finish_reason=choice.finish_reason,
    )


async def _short_run(root: Path) -> Path:
    backend = adv.LocalBackend(root, progress=False)
    model = adv.TrainableModel("report", project="t", base_model="smollm2-135m-instruct")
    await model.register(backend)
    try:

        async def groups(n: int) -> list[adv.TrajectoryGroup]:
            return await adv.gather_trajectory_groups(
                [[_rollout(model) for _ in range(4)] for _ in range(n)], progress=False
            )

        await model.log(await groups(1), split="val")
        for _ in range(2):
            await model.train(await groups(2), adv.TrainConfig(learning_rate=1e-3))
        await model.log(await groups(1), split="val")
        return backend.run_dir(model)
    finally:
        await backend.close()


@pytest.fixture(scope="module")
def report_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report-run")
    # Its own thread: playwright's sync API keeps an event loop running in the test thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        run_dir = pool.submit(asyncio.run, _short_run(root)).result()
    return write_report(run_dir)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(
                f"{CHROMIUM} is missing in CI: .ci/run installs Debian's chromium before `make test`."
            )
        pytest.skip(f"{CHROMIUM} is absent: `apt-get install chromium` to run the report's browser test.")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def _open(browser: Any, path: Path) -> tuple[Any, list[str], list[str]]:
    """The opened report, with the console errors and the requests it made."""
    page = browser.new_page()
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_selector("#headline svg")
    return page, errors, requests


@pytest.fixture
def page(browser: Any, report_path: Path) -> Iterator[tuple[Any, list[str], list[str]]]:
    opened = _open(browser, report_path)
    yield opened
    opened[0].close()


# The collapsed demo run of issue 20 (steps 2-6 filled in): reward peaks at step 7 as drift climbs.
COLLAPSED = [0.534, 0.55, 0.60, 0.64, 0.68, 0.70, 0.738, 0.722, 0.541, 0.359, 0.291, 0.178]


@pytest.fixture
def collapsed_page(browser: Any, tmp_path: Path) -> Iterator[tuple[Any, list[str], list[str]]]:
    """The report of a run that collapsed after step 7 and was restored to it as step 13."""
    rows: list[dict[str, Any]] = [{"step": 0, "split": "val", "val/reward": 0.55, "val/success": 0.31}]
    for s, r in enumerate(COLLAPSED, 1):
        rows.append({"step": s, "split": "train", "train/reward": r, "entropy": 0.9 - 0.06 * s,
                     "logprob_drift_mean_abs": 0.01 + 0.005 * s, "loss": 0.1})  # fmt: skip
        if s % 4 == 3:
            rows.append({"step": s, "split": "val", "val/reward": r, "val/success": r - 0.1})
    rows.append({"step": 13, "split": "restore", "restored_from": 7, "metric": "val/success", "value": 0.628})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"time": 0.0, **r}) + "\n" for r in rows))
    opened = _open(browser, write_report(tmp_path))
    yield opened
    opened[0].close()


def test_report_opens_offline_and_draws_the_curves(page: tuple[Any, list[str], list[str]]) -> None:
    p, errors, requests = page
    assert errors == []
    assert all(u.startswith("file://") for u in requests), requests
    titles = p.locator("#headline .chart h3").all_inner_texts()
    assert titles[0] == "Reward" and "Loss" in titles
    stack = p.locator("#headline .stack .chart")
    assert "Logprob drift (sampler vs trainer)" in stack.locator("h3").all_inner_texts()
    # No restore row in this run: the best step is chosen by val/reward, said so, and marked on the stack.
    assert "val/reward" in p.locator("#best").inner_text()
    assert stack.locator(".marker").count() == stack.count()
    reward = p.locator("#headline .chart").first
    assert reward.locator("svg path").count() >= 2  # train and val reward
    assert reward.locator("svg text").count() > 6  # tick labels and axis labels
    assert "train/reward" in reward.inner_text() and "val/reward" in reward.inner_text()
    assert (
        "No ceiling fit" in p.locator("#fit").inner_text()
    )  # two steps are too few to fit: said, not hidden


def test_clicking_a_trajectory_shows_its_messages(page: tuple[Any, list[str], list[str]]) -> None:
    p, errors, _ = page
    rows = p.locator("tr.member-row")
    assert rows.count() == 4
    rows.nth(3).click()
    member = rows.nth(3).get_attribute("data-member")
    pane = p.locator("#panes .pane")
    assert pane.count() == 1 and pane.get_attribute("data-member") == member
    assert "Paris: 5°C, windy" in pane.inner_text()  # the tool result the policy answered
    assert pane.locator(".msg.sampled").count() == 1  # the policy's turn, marked as trained on
    assert pane.locator(".msg").count() == len(CONTEXT) + 1  # every message, the folded context included
    pane.locator("details.context summary").click()  # the earlier context folds away; it opens on a click
    assert "Weather in Paris?" in pane.inner_text() and "→ get_weather" in pane.inner_text()
    assert "RULER (test-judge) score" in pane.locator(".logs").inner_text()
    p.locator("button[data-mode='best-worst']").click()
    headings = p.locator("#panes .pane h3").all_inner_texts()
    assert len(headings) == 2 and headings[0].startswith("best") and headings[1].startswith("worst")
    p.select_option("#split", "val")
    assert p.locator("#step option").all_inner_texts() == ["step 0", "step 2"]
    assert errors == []


def test_trajectory_markup_stays_text(page: tuple[Any, list[str], list[str]]) -> None:
    p, _, _ = page
    p.locator("tr.member-row").first.click()
    p.locator("#panes details.context summary").first.click()
    assert p.evaluate("window.__xss") is None
    assert p.locator("#panes img").count() == 0
    assert XSS in p.locator("#panes").inner_text()


def test_entropy_and_drift_stack_under_the_reward_with_the_best_step(
    collapsed_page: tuple[Any, list[str], list[str]],
) -> None:
    p, errors, requests = collapsed_page
    assert errors == [] and all(u.startswith("file://") for u in requests), (errors, requests)
    stack = p.locator("#headline .stack .chart")
    titles = stack.locator("h3").all_inner_texts()
    assert titles == ["Reward", "Policy entropy", "Logprob drift (sampler vs trainer)"]
    markers = stack.locator(".marker line")
    assert markers.count() == 3
    xs = {markers.nth(i).get_attribute("x1") for i in range(3)}
    assert len(xs) == 1  # step 7 sits at the same x on every panel: one x range, one left margin
    boxes = [stack.nth(i).locator("svg").bounding_box() for i in range(3)]
    assert len({(round(b["x"]), round(b["width"])) for b in boxes}) == 1  # the panels are as wide, aligned
    assert stack.locator(".marker text").first.text_content() == "best step 7"  # SVG: no inner_text
    best = p.locator("#best").inner_text()
    assert "Best step 7" in best and "val/success" in best and "restored as step 13" in best
    fit = p.locator("#fit")
    assert "not rising" in fit.inner_text() and "warn" in (fit.get_attribute("class") or "")
    assert stack.first.locator("path.fitline").count() == 0  # no ceiling drawn for a collapse
