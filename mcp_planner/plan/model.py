"""The plan model: plans, steps, options, statuses, results and summaries. No I/O.

Names mirror the seed's Go `executionplan` package in Python form. Everything here is a pydantic model so a
plan round-trips through JSON (the store, the MCP tools, plan files) without loss.
"""

from __future__ import annotations

import difflib
import gc
import hashlib
import heapq
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from mcp_planner.errors import PlanStateError, Problem
from mcp_planner.plan.templating import condition_template, referenced_steps

#: Results larger than this are kept whole in the store but shown as a preview plus a resource URI.
RESULT_PREVIEW_LIMIT = 64 * 1024
#: The sane cap on `max_parallel_steps` (SPEC section 3).
MAX_PARALLEL_CAP = 64
DEFAULT_PARALLEL = 3
#: Bounds on what a plan may ask for (SPEC section 4, "Numbers are bounded"): nothing stored can then make a
#: later read, wait or retry loop misbehave.
MAX_RETRIES = 100
MAX_DURATION_MS = 24 * 3600 * 1000
MAX_BACKOFF = 10.0
MAX_DESCRIPTION_CHARS = 10_000
MAX_STEPS = 10_000
MAX_PARAMETERS_BYTES = 1024 * 1024
#: The most items a `for_each` may give (SPEC section 12), and the most outputs a plan may name.
MAX_ITEMS = 10_000
MAX_OUTPUTS = 100
#: The error of a step whose `when` was false starts with this; such a skip is not a failure.
CONDITION_FALSE = "condition false: "
#: Approval methods in which a person decided; once one has, edits need a person again (`needs_person`).
PERSON_METHODS = frozenset({"elicitation", "human-terminal"})
#: `plan.metadata` key listing steps whose call was interrupted (crash, kill) and whose outcome is unknown.
INTERRUPTED_KEY = "interrupted_steps"
#: The error of such a step: its tool may or may not have acted.
INTERRUPTED_ERROR = "interrupted; outcome unknown"
RERUN_HINT = "call resume_plan with rerun_interrupted=true to run them again"


def utcnow() -> datetime:
    return datetime.now(UTC)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many objects at once (a plan's steps, a summary).

    CPython collects after every 700 allocations, and fully when enough objects survived; each full
    collection walks everything alive, a large plan included, so reading a 100,000-step plan took 6x as
    long with the collector running. Reference counting frees objects as usual meanwhile. Use it around
    synchronous work only, never across an `await`.
    """
    if not gc.isenabled():  # already paused (by an enclosing call, or by the application)
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def set_fields(model: BaseModel, **values: Any) -> None:
    """Assign fields without `validate_assignment`, for values that already have the declared types.

    Validating each assignment costs microseconds per field, too much on the executor's per-step hot path.
    """
    model.__dict__.update(values)
    model.__pydantic_fields_set__.update(values)


class PlanStatus(StrEnum):
    DRAFT = "draft"
    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"
    EXECUTING = "executing"
    COMPLETED = "completed"
    FAILED = "failed"
    PARTIAL = "partial"
    CANCELLED = "cancelled"


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"


#: The names people try for a step's fields (normalised: lower case, no `_` or `-`), by the field they mean;
#: difflib finds the rest (`paramters`, `dependson`, `timout_ms`).
STEP_FIELD_ALIASES: dict[str, str] = {
    "params": "parameters",
    "args": "parameters",
    "arguments": "parameters",
    "input": "parameters",
    "inputs": "parameters",
    "depends": "depends_on",
    "dependson": "depends_on",
    "dependencies": "depends_on",
    "needs": "depends_on",
    "after": "depends_on",
    "retries": "max_retries",
    "retry": "max_retries",
    "timeout": "timeout_ms",
    "retrydelay": "retry_delay_ms",
}
#: The same for a plan's own fields.
PLAN_FIELD_ALIASES: dict[str, str] = {
    "step": "steps",
    "tasks": "steps",
    "name": "description",
    "goal": "description",
}
#: The same for the options.
OPTION_ALIASES: dict[str, str] = {
    "parallel": "allow_parallel",
    "concurrency": "max_parallel_steps",
    "timeout": "step_timeout_ms",
    "backoff": "retry_backoff",
}
UNKNOWN_FIELD = "unknown_field"
"""The pydantic error type of an unknown field in a caller-written model (`StepSpec`, `PlanSpec`)."""


class _CallerWritten(BaseModel):
    """A model people and LLMs write by hand: an unknown field is reported with the field it most likely
    meant ("did you mean 'parameters'?"), not pydantic's bare "Extra inputs are not permitted", and the
    other problems of the same object are still reported with it."""

    _field_aliases: ClassVar[Mapping[str, str]] = {}
    _accepted: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        names: set[str] = set()
        for name, info in cls.model_fields.items():
            names.add(name)
            alias = info.validation_alias
            if isinstance(alias, str):
                names.add(alias)
            elif isinstance(alias, AliasChoices):
                names.update(c for c in alias.choices if isinstance(c, str))
        cls._accepted = frozenset(names)  # field names and their validation aliases

    @classmethod
    def where(cls, data: Mapping[str, Any]) -> str:
        """How an unknown field's message names the object it is in."""
        raise NotImplementedError

    @classmethod
    def unknown_field_message(cls, name: str, where: str) -> str:
        """`unknown field 'params' in step 'build': did you mean 'parameters'?`, or the fields there are."""
        fields = list(cls.model_fields)
        meant = cls._field_aliases.get(name.lower().replace("_", "").replace("-", ""))
        if meant is None:
            close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
            meant = close[0] if close else None
        if meant is not None:
            return f"unknown field {_quoted(name)} in {where}: did you mean {meant!r}?"
        return f"unknown field {_quoted(name)} in {where}: the fields are {', '.join(fields)}"

    @model_validator(mode="before")
    @classmethod
    def _name_unknown_fields(cls, data: Any) -> Any:
        accepted = cls._accepted
        if not isinstance(data, dict) or accepted.issuperset(data):
            return data
        where = cls.where(data)
        errors = [
            InitErrorDetails(
                type=PydanticCustomError(UNKNOWN_FIELD, cls.unknown_field_message(str(key), where)),
                loc=(str(key),),
                input=value,
            )
            for key, value in data.items()
            if key not in accepted
        ]
        try:
            cls.model_validate({k: v for k, v in data.items() if k in accepted})
        except ValidationError as exc:
            errors += [
                InitErrorDetails(
                    type=PydanticCustomError(e["type"], e["msg"]), loc=e["loc"], input=e["input"]
                )
                for e in exc.errors(include_url=False)
            ]
        raise ValidationError.from_exception_data(cls.__name__, errors)


class ExecutionOptions(_CallerWritten):
    """How a plan is approved and run. Ranges are reported by validation; NaN and infinities never parse."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    _field_aliases = OPTION_ALIASES

    @classmethod
    def where(cls, data: Mapping[str, Any]) -> str:
        return "the options"

    require_approval: bool = Field(
        default=True, description="a new plan waits in pending_approval until approved"
    )
    auto_approve: bool = Field(
        default=False, description="approve at creation even if require_approval is set"
    )
    approval_timeout_ms: int = Field(
        default=0, description="cancel a plan still pending after this long; 0 = never"
    )
    stop_on_error: bool = Field(default=True, description="after a step fails, start no new step")
    continue_on_error: bool = Field(
        default=False, description="run everything that can still run after a failure"
    )
    allow_parallel: bool = Field(default=False, description="run independent steps at the same time")
    max_parallel_steps: int = Field(
        default=DEFAULT_PARALLEL, description="steps at once when parallel (1-64)"
    )
    step_timeout_ms: int = Field(default=0, description="default bound on each attempt of a step; 0 = none")
    total_timeout_ms: int = Field(default=0, description="bound on the whole run; 0 = none")
    retry_backoff: float = Field(default=1.0, description="delay multiplier per retry: 1 fixed, 2 doubles")

    @property
    def needs_approval(self) -> bool:
        return self.require_approval and not self.auto_approve

    @property
    def slots(self) -> int:
        """How many steps may run at once."""
        if not self.allow_parallel:
            return 1
        return self.max_parallel_steps if self.max_parallel_steps > 0 else DEFAULT_PARALLEL


class _Lean(BaseModel):
    """A model of which a plan holds one per step: its instances share one `model_fields_set`.

    pydantic gives each instance its own set of the field names it was given; a step's is 728 bytes, a
    third of what a step costs in memory. Nothing here reads it (`exclude_unset` is never used on steps or
    results), so every instance shares a set of all field names: additions to it change nothing.
    """

    def model_post_init(self, context: Any, /) -> None:
        object.__setattr__(self, "__pydantic_fields_set__", _ALL_FIELDS[type(self)])


_ALL_FIELDS: dict[type[BaseModel], set[str]] = {}


class StepResult(_Lean):
    """What a downstream tool returned: its text, its structured content and every content block.

    `content` keeps the MCP content blocks a downstream tool returned as JSON objects (text, image, audio,
    resource links, embedded resources), so nothing non-textual is lost. An in-process tool returns a
    value, not blocks: its result has `text` (and `structured`) only.
    """

    text: str = ""
    structured: Any = None
    content: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def value(self) -> Any:
        """`steps.<id>.result` in templates: the structured content when there is one, else the text."""
        return self.structured if self.structured is not None else self.text

    def size(self) -> int:
        return len(self.model_dump_json())

    @classmethod
    def from_value(cls, value: Any) -> StepResult:
        """The result of an in-process tool: a string becomes text, anything else structured content (and
        its JSON as text)."""
        if isinstance(value, StepResult):
            return value
        if isinstance(value, str):
            return cls(text=value)
        return cls(text=json.dumps(value, default=str), structured=value)


class StepItem(_Lean):
    """One item of a `for_each` step: its value, and the state of its own call (durable, like a step's)."""

    value: Any = None
    status: StepStatus = StepStatus.PENDING
    result: StepResult | None = None
    error: str | None = None
    retry_count: int = 0
    duration_ms: int | None = None

    def reset(self) -> None:
        set_fields(self, status=StepStatus.PENDING, result=None, error=None, retry_count=0, duration_ms=None)


class Step(_Lean):
    model_config = ConfigDict(validate_assignment=True, allow_inf_nan=False)
    #: `items` lives in a slot, not a field: the store keeps items apart from their step (`Store` writes each
    #: item's change on its own, so a step of 10,000 items is never rewritten whole per item), and a 22nd
    #: field would grow every step's `__dict__` from 464 to 832 bytes.
    __slots__ = ("_items",)

    id: str
    index: int = 0
    tool_name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)
    status: StepStatus = StepStatus.PENDING
    result: StepResult | None = None
    error: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    duration_ms: int | None = None
    depends_on: list[str] = Field(default_factory=list)
    retry_count: int = 0
    max_retries: int = 0
    retry_delay_ms: int = 1000
    timeout_ms: int | None = None
    for_each: list[Any] | str | None = None
    max_parallel_items: int = 0
    allow_item_failures: bool = False
    when: str | None = None
    fail_if: str | None = None

    @property
    def items(self) -> list[StepItem] | None:
        """A `for_each` step's items once its list is known (None before, and for other steps)."""
        return getattr(self, "_items", None)

    @items.setter
    def items(self, value: list[StepItem] | None) -> None:
        object.__setattr__(self, "_items", value)

    def reset(self, *, keep_items: bool = False) -> None:
        """Back to `pending`, as resume does for a step that did not complete.

        `keep_items`: a `for_each` step keeps its list and its completed items (the rest go back to pending),
        so a resume calls only the items that did not complete.
        """
        set_fields(
            self,
            status=StepStatus.PENDING,
            result=None,
            error=None,
            started_at=None,
            completed_at=None,
            duration_ms=None,
            retry_count=0,
        )
        if not keep_items:
            self.items = None
        elif self.items:
            for item in self.items:
                if item.status != StepStatus.COMPLETED:
                    item.reset()

    def language_templates(self) -> dict[str, Any]:
        """`for_each`, `when` and `fail_if` as templates, by field (a bare condition is one expression)."""
        found: dict[str, Any] = {}
        if self.for_each is not None:
            found["for_each"] = self.for_each
        if self.when is not None and self.when.strip():  # an empty one is reported as such
            found["when"] = condition_template(self.when)
        if self.fail_if is not None and self.fail_if.strip():
            found["fail_if"] = condition_template(self.fail_if)
        return found

    def hash_material(self) -> dict[str, Any]:
        material = {
            "id": self.id,
            "tool_name": self.tool_name,
            "parameters": self.parameters,
            "depends_on": sorted(self.depends_on),
            "max_retries": self.max_retries,
            "retry_delay_ms": self.retry_delay_ms,
            "timeout_ms": self.timeout_ms,
        }
        for name in _LANGUAGE_FIELDS:  # only when set: the hash of a plan without them is unchanged
            value = getattr(self, name)
            if value not in (None, 0, False):
                material[name] = value
        return material


#: The plan-language fields of a step (SPEC section 12).
_LANGUAGE_FIELDS = ("for_each", "max_parallel_items", "allow_item_failures", "when", "fail_if")

_ALL_FIELDS.update({cls: set(cls.model_fields) for cls in (StepResult, StepItem, Step)})


def _step_label(data: Mapping[str, Any]) -> str:
    step_id = data.get("id")
    return f"step {_quoted(step_id)}" if isinstance(step_id, str) and step_id else "this step"


def _quoted(name: str) -> str:
    """`name!r`, shortened: what a caller wrote is echoed in messages, and it may be anything."""
    text = repr(name)
    return text if len(text) <= 80 else f"{text[:77]}..."


class StepSpec(_CallerWritten):
    """A step as a caller writes it (create_plan, plan files, generated plans)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)
    _field_aliases = STEP_FIELD_ALIASES

    id: str | None = Field(
        default=None, description="readable unique id, e.g. 'build'; default step-1, step-2, ..."
    )
    tool_name: str = Field(
        validation_alias=AliasChoices("tool_name", "tool"),
        description="downstream tool as 'server.tool' (see list_tools); bare if only one server has it",
    )
    description: str = Field(default="", description="what the step does, for the person approving")
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="the tool's arguments; a string may use {{ steps.<id>.result }} (or .text, .json) "
        "to pass an earlier step's output",
    )
    depends_on: list[str] = Field(
        default_factory=list,
        description="ids of steps that must complete first (template references add theirs)",
    )
    max_retries: int = Field(
        default=0, description="retries after a failed attempt; keep 0 for non-idempotent calls"
    )
    retry_delay_ms: int = Field(default=1000, description="wait before the first retry")
    timeout_ms: int | None = Field(
        default=None, description="bound on each attempt; overrides step_timeout_ms"
    )
    for_each: list[Any] | str | None = Field(
        default=None,
        description="a list, or a template giving one: the tool is called once per item, with {{ item }} "
        "and {{ item_index }} in the parameters; the result is the list of the items' results",
    )
    max_parallel_items: int = Field(default=0, description="for_each: items at once (0: the plan's slots)")
    allow_item_failures: bool = Field(
        default=False, description="for_each: complete even if some items fail (they are listed)"
    )
    when: str | None = Field(
        default=None,
        description="condition checked once the dependencies have finished, e.g. "
        '"steps.check.result.changed" or "steps.deploy.status == \'failed\'"; false skips the step',
    )
    fail_if: str | None = Field(
        default=None,
        description="check on each attempt's result, e.g. \"'ERROR' in result.text\"; true fails "
        "(and retries) the attempt",
    )

    @classmethod
    def where(cls, data: Mapping[str, Any]) -> str:
        return _step_label(data)

    @classmethod
    def from_step(cls, step: Step) -> StepSpec:
        """What a caller would write to get `step` again: its definition, none of its run state."""
        return cls.model_validate(step.model_dump(include=set(cls.model_fields)))


class PlanSpec(_CallerWritten):
    """A plan as a caller writes it: what `create_plan` takes and what a plan file holds."""

    model_config = ConfigDict(extra="forbid")
    _field_aliases = PLAN_FIELD_ALIASES

    description: str
    steps: list[StepSpec] = Field(default_factory=list)
    options: ExecutionOptions = Field(default_factory=ExecutionOptions)
    inputs: dict[str, Any] | None = Field(
        default=None,
        description="JSON Schema of the values the plan takes ({{ inputs.<name> }}): properties, required, "
        "defaults",
    )
    outputs: dict[str, str] = Field(
        default_factory=dict,
        description="name -> template over step results and inputs, rendered at the end and returned first",
    )
    metadata: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def where(cls, data: Mapping[str, Any]) -> str:
        return "the plan"


class StepSummary(BaseModel):
    id: str
    tool_name: str
    status: StepStatus
    duration_ms: int | None = None
    error: str | None = None
    retry_count: int = 0


class PlanSummary(BaseModel):
    plan_id: str
    description: str
    status: PlanStatus
    total_steps: int
    completed: int
    failed: int
    skipped: int
    pending: int
    running: int
    progress: float = Field(description="percent of steps completed; 0 for an empty plan")
    duration_ms: int | None = None
    error: str | None = None
    steps: list[StepSummary] = Field(default_factory=list)
    steps_omitted: int = Field(
        default=0, description="steps not listed here (those listed need attention first); get_plan has all"
    )
    outputs: dict[str, Any] = Field(
        default_factory=dict, description="the plan's outputs, rendered at its end"
    )
    output_errors: dict[str, str] = Field(
        default_factory=dict, description="outputs that could not be rendered, with why"
    )

    def __getitem__(self, key: str) -> Any:
        """`summary["progress"]` as well as `summary.progress`, for callers used to the seed's map."""
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)


#: How many steps a short summary lists (what tools and the CLI show); a plan's own `summary()` lists all.
SUMMARY_STEPS = 20
#: The order in which a short summary picks steps: those a reader needs first.
ATTENTION_ORDER = (
    StepStatus.FAILED,
    StepStatus.RUNNING,
    StepStatus.SKIPPED,
    StepStatus.PENDING,
    StepStatus.COMPLETED,
)
_ATTENTION_RANK = {status: rank for rank, status in enumerate(ATTENTION_ORDER)}


def attention_first(statuses: Sequence[StepStatus], limit: int) -> list[int]:
    """The positions of at most `limit` steps, by `ATTENTION_ORDER` then position, in plan order."""
    if len(statuses) <= limit:
        return list(range(len(statuses)))
    chosen = heapq.nsmallest(limit, range(len(statuses)), key=lambda i: (_ATTENTION_RANK[statuses[i]], i))
    return sorted(chosen)


def make_summary(
    plan_id: str,
    description: str,
    status: PlanStatus,
    error: str | None,
    duration_ms: int | None,
    counts: Mapping[StepStatus, int],
    steps: list[StepSummary],
    outputs: Mapping[str, Any] | None = None,
    output_errors: Mapping[str, str] | None = None,
) -> PlanSummary:
    """A summary from a plan's counts and the steps it lists (the rest are counted as omitted)."""
    total = sum(counts.values())
    completed = counts.get(StepStatus.COMPLETED, 0)
    return PlanSummary(
        plan_id=plan_id,
        description=description,
        status=status,
        total_steps=total,
        completed=completed,
        failed=counts.get(StepStatus.FAILED, 0),
        skipped=counts.get(StepStatus.SKIPPED, 0),
        pending=counts.get(StepStatus.PENDING, 0),
        running=counts.get(StepStatus.RUNNING, 0),
        progress=round(100.0 * completed / total, 1) if total else 0.0,
        duration_ms=duration_ms,
        error=error,
        steps=steps,
        steps_omitted=total - len(steps),
        outputs=dict(outputs or {}),
        output_errors=dict(output_errors or {}),
    )


class ExecutionPlan(BaseModel):
    model_config = ConfigDict(validate_assignment=True, allow_inf_nan=False)

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    description: str
    steps: list[Step] = Field(default_factory=list)
    status: PlanStatus = PlanStatus.DRAFT
    options: ExecutionOptions = Field(default_factory=ExecutionOptions)
    user_approved: bool = False
    approved_by: str | None = None
    approved_at: datetime | None = None
    rejection_note: str | None = None
    current_step: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    pending_since: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    total_duration_ms: int | None = None
    error: str | None = None
    plan_hash: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    #: The JSON Schema of the values the plan takes, and those values (defaults applied).
    inputs: dict[str, Any] | None = None
    input_values: dict[str, Any] = Field(default_factory=dict)
    #: Output name -> template; what they rendered to when the run ended, and those that failed to render.
    outputs: dict[str, str] = Field(default_factory=dict)
    output_values: dict[str, Any] = Field(default_factory=dict)
    output_errors: dict[str, str] = Field(default_factory=dict)
    #: The stored revision this copy was read at (0: never stored). Every write is a compare-and-set on it,
    #: so a write based on an outdated copy fails instead of silently undoing someone else's.
    revision: int = Field(default=0, exclude=True)

    _taken_ids: set[str] | None = PrivateAttr(default=None)
    _taken_key: tuple[int, str | None] = PrivateAttr(default=(0, None))

    # -- construction -----------------------------------------------------------------------------------

    @classmethod
    def new(cls, description: str) -> ExecutionPlan:
        return cls(description=description)

    @classmethod
    def from_spec(cls, spec: PlanSpec, values: Mapping[str, Any] | None = None) -> ExecutionPlan:
        """Build a draft plan from what a caller wrote and the values of its inputs (their schema's defaults
        fill the rest); validation is separate (`validate`)."""
        plan = cls(
            description=spec.description,
            options=spec.options.model_copy(),
            metadata=spec.metadata,
            inputs=spec.inputs,
            outputs=spec.outputs,
        )
        plan.set_inputs(values or {})
        with gc_paused():
            for s in spec.steps:
                step = plan.add_step(s.tool_name, s.description, s.parameters, step_id=s.id)
                set_fields(
                    step,
                    max_retries=s.max_retries,
                    retry_delay_ms=s.retry_delay_ms,
                    timeout_ms=s.timeout_ms,
                    for_each=s.for_each,
                    max_parallel_items=s.max_parallel_items,
                    allow_item_failures=s.allow_item_failures,
                    when=s.when,
                    fail_if=s.fail_if,
                )
                refs = referenced_steps(step.language_templates()) - {step.id}
                step.depends_on = _merge(s.depends_on, _merge(step.depends_on, sorted(refs)))
        return plan

    def set_inputs(self, values: Mapping[str, Any]) -> None:
        """Set the values of the plan's inputs: those given, then each property's default. Validation checks
        them against the schema (`inputs`)."""
        merged = dict(values)
        properties = (self.inputs or {}).get("properties")
        if isinstance(properties, dict):
            for name, schema in properties.items():
                if name not in merged and isinstance(schema, dict) and "default" in schema:
                    merged[name] = schema["default"]
        self.input_values = merged

    def add_step(
        self,
        tool_name: str,
        description: str,
        parameters: dict[str, Any] | None = None,
        step_id: str | None = None,
    ) -> Step:
        """Append a step and return it; later edits of the returned object stick.

        Steps named in parameter templates (`{{ steps.<id>... }}`) become dependencies.
        """
        parameters = dict(parameters or {})
        if step_id is None:
            step_id = self._next_step_id()
        step = Step(
            id=step_id,
            index=len(self.steps),
            tool_name=tool_name,
            description=description,
            parameters=parameters,
            depends_on=sorted(referenced_steps(parameters)),
        )
        self.steps.append(step)
        if self._taken_ids is not None:
            self._taken_ids.add(step.id)
            self._taken_key = (len(self.steps), step.id)
        self.touch()
        return step

    def _next_step_id(self) -> str:
        # Rebuilding the set of taken ids on every call made building a large plan quadratic; it is
        # rebuilt only when the steps changed other than by appending through add_step.
        key = (len(self.steps), self.steps[-1].id if self.steps else None)
        if self._taken_ids is None or self._taken_key != key:
            self._taken_ids = {s.id for s in self.steps}
        n = len(self.steps) + 1
        while f"step-{n}" in self._taken_ids:
            n += 1
        return f"step-{n}"

    def __eq__(self, other: object) -> bool:
        # Field values only: the id cache above is not part of a plan's identity.
        if not isinstance(other, ExecutionPlan):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]

    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def touch(self) -> None:
        self.updated_at = utcnow()

    # -- approval ---------------------------------------------------------------------------------------

    def compute_hash(self) -> str:
        """sha256 of the canonical JSON of everything an approval vouches for."""
        material: dict[str, Any] = {
            "description": self.description,
            "options": self.options.model_dump(mode="json"),
            "steps": [s.hash_material() for s in self.steps],
        }
        if self.inputs is not None or self.input_values:  # only when used: older hashes stay valid
            material["inputs"] = {"schema": self.inputs, "values": self.input_values}
        if self.outputs:
            material["outputs"] = self.outputs
        canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def submit(self) -> None:
        """Decide a new plan's first status from its options: `pending_approval` or auto-`approved`."""
        if self.status not in (PlanStatus.DRAFT, PlanStatus.PENDING_APPROVAL, PlanStatus.APPROVED):
            raise PlanStateError(f"plan {self.id!r} is {self.status.value}: it can no longer be submitted")
        self.clear_approval()
        if self.options.needs_approval:
            self.status = PlanStatus.PENDING_APPROVAL
            self.pending_since = utcnow()
        else:
            self._set_approved("auto", method="auto")

    def approve(self, by: str = "user", *, method: str = "agent") -> None:
        """Approve the plan as it is now; its hash is pinned so later edits void the approval.

        Raises:
            PlanStateError: the plan is not `draft` or `pending_approval`, or its approval timed out.
        """
        if self.expire_approval():
            raise PlanStateError(f"plan {self.id!r} can no longer be approved: approval timed out")
        if self.status not in (PlanStatus.DRAFT, PlanStatus.PENDING_APPROVAL):
            raise PlanStateError(
                f"plan {self.id!r} is {self.status.value}: "
                "only a draft or pending_approval plan can be approved"
            )
        self._set_approved(by, method=method)

    @property
    def needs_person(self) -> bool:
        """A person approved or was asked about this plan: any new version needs a person's approval too."""
        return bool(self.metadata.get("needs_person"))

    def mark_person_involved(self) -> None:
        if not self.needs_person:
            self.metadata = {**self.metadata, "needs_person": True}

    def _set_approved(self, by: str, *, method: str) -> None:
        self.user_approved = True
        self.approved_by = by
        self.approved_at = utcnow()
        self.plan_hash = self.compute_hash()
        self.metadata = {**self.metadata, "approval_method": method}
        if method in PERSON_METHODS:
            self.mark_person_involved()
        self.status = PlanStatus.APPROVED
        self.pending_since = None
        self.touch()

    def reject(self, note: str) -> None:
        """Reject the plan: it becomes `cancelled` and can never run.

        Raises:
            PlanStateError: the plan is not `draft`, `pending_approval` or `approved`.
        """
        if self.status not in (PlanStatus.DRAFT, PlanStatus.PENDING_APPROVAL, PlanStatus.APPROVED):
            raise PlanStateError(
                f"plan {self.id!r} is {self.status.value}: only a draft, pending_approval or approved plan "
                "can be rejected"
                + ("; call cancel_plan to stop it" if self.status == PlanStatus.EXECUTING else "")
            )
        self.user_approved = False
        self.rejection_note = note
        self.status = PlanStatus.CANCELLED
        self.pending_since = None
        self.touch()

    def clear_approval(self) -> None:
        self.user_approved = False
        self.approved_by = None
        self.approved_at = None
        self.plan_hash = None
        if self.status == PlanStatus.APPROVED:
            self.status = PlanStatus.PENDING_APPROVAL if self.options.needs_approval else PlanStatus.DRAFT
            self.pending_since = utcnow() if self.options.needs_approval else None

    def expire_approval(self, now: datetime | None = None) -> bool:
        """Cancel a plan that has waited for approval longer than `approval_timeout_ms`; True if it did."""
        timeout = self.options.approval_timeout_ms
        if timeout <= 0 or not self.options.needs_approval:
            return False
        if self.status not in (PlanStatus.DRAFT, PlanStatus.PENDING_APPROVAL):
            return False
        since = self.pending_since or self.created_at
        if ((now or utcnow()) - since).total_seconds() * 1000 < timeout:
            return False
        self.status = PlanStatus.CANCELLED
        self.error = "approval timed out"
        self.pending_since = None
        self.touch()
        return True

    def is_approved(self) -> bool:
        """Approved, and not edited since: the pinned hash still matches."""
        return self.user_approved and self.plan_hash is not None and self.plan_hash == self.compute_hash()

    def is_completed(self) -> bool:
        return self.status == PlanStatus.COMPLETED

    # -- reporting --------------------------------------------------------------------------------------

    def summary(self, limit: int | None = None) -> PlanSummary:
        """Status, counts, progress and each step's state; with `limit`, at most that many steps, those
        that need attention first (`attention_first`), in plan order."""
        with gc_paused():
            counts = dict.fromkeys(StepStatus, 0)
            for s in self.steps:
                counts[s.status] += 1
            listed = self.steps
            if limit is not None and len(listed) > limit:
                listed = [listed[i] for i in attention_first([s.status for s in listed], limit)]
            steps = [
                StepSummary(
                    id=s.id,
                    tool_name=s.tool_name,
                    status=s.status,
                    duration_ms=s.duration_ms,
                    error=s.error,
                    retry_count=s.retry_count,
                )
                for s in listed
            ]
            return make_summary(
                self.id,
                self.description,
                self.status,
                self.error,
                self.total_duration_ms,
                counts,
                steps,
                self.output_values,
                self.output_errors,
            )

    def validate(  # type: ignore[override]
        self, catalog: Mapping[str, dict[str, Any] | None] | None = None, *, max_steps: int = MAX_STEPS
    ) -> list[Problem]:
        """Every problem with this plan against `catalog` (tool name -> input schema, or None if unknown).

        `catalog=None` skips the tool checks (unknown tool, parameter schemas). `max_steps`: the most steps
        a plan may have (a deployment's limit, never the plan's own).
        """
        from mcp_planner.plan.validation import validate_plan  # validation imports this module

        problems: list[Problem] = validate_plan(self, catalog, max_steps=max_steps)
        return problems


def _merge(first: list[str], second: list[str]) -> list[str]:
    return list(dict.fromkeys([*first, *second]))
