"""mcp-planner: planning as MCP tools, and the same engine as a library.

from mcp_planner import ExecutionPlan, Executor, PlanStore
"""

from typing import TYPE_CHECKING, Any

from .errors import (
    PlannerError,
    PlanNotFoundError,
    PlanStateError,
    PlanValidationError,
    Problem,
    StepError,
)
from .model import (
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
from .storage import Event, MemoryStore
from .tools import LocalTools, ToolInfo, ToolProvider

if TYPE_CHECKING:
    from .config import ServersConfig, load_config
    from .downstream import Downstream
    from .executor import Executor
    from .generator import Generator, PlanRequest
    from .store import PlanStore

# Imported on first use: `mcp-planner serve` must answer `tools/list` fast, before it needs these.
_LAZY = {
    "Downstream": ".downstream",
    "ServersConfig": ".config",
    "load_config": ".config",
    "Executor": ".executor",
    "Generator": ".generator",
    "PlanRequest": ".generator",
    "PlanStore": ".store",
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
