"""Plans run end to end by the executor through real downstream servers (examples and test servers)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from mcp_planner.downstream.client import Downstream
from mcp_planner.downstream.config import ServersConfig, load_config
from mcp_planner.engine.executor import Executor
from mcp_planner.plan.model import ExecutionOptions, ExecutionPlan, PlanSpec, PlanStatus, StepSpec, StepStatus
from mcp_planner.store.sqlite import PlanStore

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parent.parent
READY = 30


def plan_of(steps: list[dict[str, Any]], **options: Any) -> ExecutionPlan:
    spec = PlanSpec(
        description="e2e",
        steps=[StepSpec.model_validate(s) for s in steps],
        options=ExecutionOptions(require_approval=False, **options),
    )
    plan = ExecutionPlan.from_spec(spec)
    plan.submit()
    return plan


def example_servers(tmp_path: Path) -> ServersConfig:
    env = {
        "PYTHON": sys.executable,
        "WORKSPACE_ROOT": str(tmp_path / "workspace"),
        "CI_STATE_DIR": str(tmp_path / "ci"),
        "CI_DELAY": "0",
    }
    return load_config(ROOT / "examples" / "servers.json", env)


RELEASE = [
    {"id": "checkout", "tool": "ci.checkout", "parameters": {"repo": "acme/app"}},
    {"id": "lint", "tool": "ci.lint", "parameters": {"commit": "{{ steps.checkout.result.commit }}"}},
    {
        "id": "unit",
        "tool": "ci.test",
        "parameters": {"suite": "unit", "commit": "{{ steps.checkout.result.commit }}"},
    },
    {
        "id": "integration",
        "tool": "ci.test",
        "parameters": {"suite": "integration", "commit": "{{ steps.checkout.result.commit }}"},
    },
    {
        "id": "registry",
        "tool": "ci.flaky",
        "parameters": {"key": "registry-login", "failures": 2},
        "max_retries": 3,
        "retry_delay_ms": 10,
    },
    {
        "id": "build",
        "tool": "ci.build",
        "parameters": {"version": "1.4.2", "commit": "{{ steps.checkout.result.commit }}"},
        "depends_on": ["lint", "unit", "integration"],
    },
    {
        "id": "notes",
        "tool": "workspace.write_file",
        "parameters": {
            "path": "release/NOTES.md",
            "content": "Release v{{ steps.build.result.version }}\n{{ steps.build.result.artifact }}",
        },
    },
    {
        "id": "lines",
        "tool": "workspace.run",
        "parameters": {"command": "count_lines", "path": "release/NOTES.md"},
        "depends_on": ["notes"],
    },
    {
        "id": "deploy",
        "tool": "ci.deploy",
        "parameters": {"artifact": "{{ steps.build.result.artifact }}", "environment": "staging"},
        "depends_on": ["lines", "registry"],
    },
]


async def test_a_release_plan_runs_through_the_example_servers(tmp_path: Path) -> None:
    plan = plan_of(RELEASE, allow_parallel=True)
    async with Downstream(example_servers(tmp_path)) as downstream:
        assert await downstream.wait_ready(READY)
        summary = await Executor(downstream).execute(plan)

    assert summary.status == PlanStatus.COMPLETED, summary
    steps = {s.id: s for s in plan.steps}
    assert all(s.status == StepStatus.COMPLETED for s in plan.steps)
    assert steps["registry"].retry_count == 2
    assert steps["lines"].result is not None and steps["lines"].result.structured["output"] == 2
    deploy = steps["deploy"].result
    assert deploy is not None
    assert deploy.structured["artifact"] == "dist/app-1.4.2.tar.gz"
    assert deploy.structured["environment"] == "staging"
    notes = (tmp_path / "workspace" / "release" / "NOTES.md").read_text()
    assert notes == "Release v1.4.2\ndist/app-1.4.2.tar.gz"


async def test_downstream_failures_reach_the_plan_and_large_results_are_stored_whole(tmp_path: Path) -> None:
    servers = Path(__file__).parent / "servers"
    config = ServersConfig.from_dict(
        {
            "mcpServers": {
                "basic": {"command": sys.executable, "args": [str(servers / "basic.py")]},
                "crashy": {"command": sys.executable, "args": [str(servers / "crashy.py")]},
            }
        },
        {},
    )
    plan = plan_of(
        [
            {"id": "big", "tool": "basic.big", "parameters": {"size": 70_000}},
            {"id": "crash", "tool": "crashy.die", "parameters": {"message": "segfault"}, "max_retries": 1},
            {"id": "after", "tool": "crashy.pid", "depends_on": ["crash"]},
            {"id": "refused", "tool": "basic.fail", "parameters": {"message": "quota exceeded"}},
        ],
        stop_on_error=False,
        continue_on_error=True,
    )
    async with PlanStore.open(tmp_path / "plans.db") as store, Downstream(config) as downstream:
        assert await downstream.wait_ready(READY)
        summary = await Executor(downstream, store).execute(plan)
        stored = await store.get_plan(plan.id)
        restarted = downstream.status()["crashy"]

    steps = {s.id: s for s in stored.steps}
    assert summary.status != PlanStatus.COMPLETED
    big = steps["big"].result
    assert steps["big"].status == StepStatus.COMPLETED and big is not None
    assert len(big.text) == 70_000
    assert [block["type"] for block in big.content] == ["text", "image", "resource"]
    assert steps["crash"].status == StepStatus.FAILED
    assert steps["crash"].retry_count == 1
    assert steps["crash"].error is not None and "segfault" in steps["crash"].error
    assert steps["after"].status == StepStatus.SKIPPED
    assert steps["refused"].status == StepStatus.FAILED
    assert steps["refused"].error is not None and "quota exceeded" in steps["refused"].error
    # The retry of the crashed step restarted the server (and crashed it again).
    assert restarted.state == "failed"
