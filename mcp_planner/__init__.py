"""mcp-planner: planning as MCP tools, and the same engine as a library.

from mcp_planner import ExecutionPlan, Executor, PlanStore
"""

from .errors import (
    PlannerError,
    PlanNotFoundError,
    PlanStateError,
    PlanValidationError,
    Problem,
    StepError,
)
from .executor import Executor
from .generator import Generator, PlanRequest
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
from .store import PlanStore
from .tools import LocalTools, ToolInfo, ToolProvider

__all__ = [
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
    "Step",
    "StepError",
    "StepResult",
    "StepSpec",
    "StepStatus",
    "ToolInfo",
    "ToolProvider",
]

# Executor, PlanStore, Generator and PlanRequest are added here as their modules land.
