"""mcp-planner: planning as MCP tools, and the same engine as a library.

from mcp_planner import ExecutionPlan, Executor, PlanStore
"""

from typing import TYPE_CHECKING, Any

from mcp_planner.engine.tools import LocalTools, ToolInfo, ToolProvider
from mcp_planner.errors import (
    PlannerError,
    PlanNotFoundError,
    PlanStateError,
    PlanValidationError,
    Problem,
    StepError,
)
from mcp_planner.plan.model import (
    ExecutionOptions,
    ExecutionPlan,
    PlanSpec,
    PlanStatus,
    PlanSummary,
    Step,
    StepResult,
    StepSpec,
    StepStatus,
)
from mcp_planner.store.base import Event
from mcp_planner.store.memory import MemoryStore

if TYPE_CHECKING:
    from mcp_planner.downstream.client import Downstream
    from mcp_planner.downstream.config import ServersConfig, load_config
    from mcp_planner.engine.executor import Executor
    from mcp_planner.generation.generator import Generator, PlanRequest
    from mcp_planner.store.sqlite import PlanStore

# Imported on first use: `mcp-planner serve` must answer `tools/list` fast, before it needs these.
_LAZY = {
    "Downstream": ".downstream.client",
    "ServersConfig": ".downstream.config",
    "load_config": ".downstream.config",
    "Executor": ".engine.executor",
    "Generator": ".generation.generator",
    "PlanRequest": ".generation.generator",
    "PlanStore": ".store.sqlite",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Downstream",
    "Event",
    "ExecutionOptions",
    "ExecutionPlan",
    "Executor",
    "Generator",
    "LocalTools",
    "MemoryStore",
    "PlanNotFoundError",
    "PlanRequest",
    "PlanSpec",
    "PlanStateError",
    "PlanStatus",
    "PlanStore",
    "PlanSummary",
    "PlanValidationError",
    "PlannerError",
    "Problem",
    "ServersConfig",
    "Step",
    "StepError",
    "StepResult",
    "StepSpec",
    "StepStatus",
    "ToolInfo",
    "ToolProvider",
    "load_config",
]
