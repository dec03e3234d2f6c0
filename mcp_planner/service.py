"""The application layer: what the MCP server's tools and the CLI's commands do, with no MCP types.

Executing a plan is submitting a run to the store's queue and following the plan's stored state: a runner
executes it (`runner.py`), so the run outlives the caller. `execute_plan` returns after `wait_seconds` or at
the end (the MCP server's tools must answer within the client's timeout; the CLI passes `wait_seconds=None`).
The rules of who may do what to a plan in which state belong to the engine's executor; every operation reads
the plan from the store first (applying approval timeouts) and writes it back as a compare-and-set, so a
race is lost cleanly and the operation re-applied to the state that won. Every approval, rejection and
cancellation is written to the plan's event log with who did it and how.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, Concatenate, Literal, ParamSpec, Self, TypeVar, get_args

import anyio

from mcp_planner.engine.admission import check_can_execute, check_can_resume
from mcp_planner.engine.builtins import with_builtins
from mcp_planner.engine.tools import ServerStatus, StatusReporter, ToolInfo, ToolProvider, schema_catalog
from mcp_planner.errors import (
    PlanChangedError,
    PlanClaimedError,
    PlanConflictError,
    PlanStateError,
    PlanValidationError,
    Problem,
)
from mcp_planner.plan.model import (
    MAX_STEPS,
    PERSON_METHODS,
    SUMMARY_STEPS,
    ExecutionOptions,
    ExecutionPlan,
    PlanSpec,
    PlanStatus,
    PlanSummary,
    StepSpec,
    StepStatus,
    utcnow,
)
from mcp_planner.runner import DetachedRunners, Runner, local_key, reclaim_orphans
from mcp_planner.store.base import (
    DEFAULT_STALE_AFTER,
    Event,
    PlanProgress,
    QueueStore,
    RunKind,
    RunnerInfo,
    RunRecord,
    RunRequest,
    RunState,
    claim_is_live,
    new_owner_id,
)

log = logging.getLogger("mcp_planner.service")

ApprovalPolicy = Literal["auto", "agent", "human"]
APPROVAL_POLICIES: tuple[ApprovalPolicy, ...] = get_args(ApprovalPolicy)

#: Called as steps start and end with the plan's progress: its status, step counts and the events since the
#: last call; plain or async.
ProgressCallback = Callable[[PlanProgress], Awaitable[None] | None]

#: How long `cancel_plan` waits for an executing plan's runner to stop it.
CANCEL_WAIT = 10.0
#: How long a caller with `wait_seconds=0` still waits for a runner to take the run and start it, so that
#: a refusal (not approved, claimed elsewhere) reaches the caller instead of being lost. A runner started on
#: demand takes its run as soon as it is up (a second, or several on a busy machine).
START_WAIT = 30.0
#: How often a follower reads the stored plan's progress: a look costs per change since the last one, and
#: a caller reporting progress wants it often enough to read, not per step.
FOLLOW_POLL_S = 0.25
PROGRESS_POLL_S = 0.1
#: The least time between two reads of a followed plan (a burst of steps becomes one summary).
PROGRESS_COALESCE_S = 0.02
#: How long a progress listener may take before it is skipped.
LISTENER_WAIT = 2.0

_NOT_STARTED = (PlanStatus.DRAFT, PlanStatus.PENDING_APPROVAL, PlanStatus.APPROVED)
#: How many times an operation is re-run from a fresh read when its compare-and-set write loses a race.
_CONFLICT_ATTEMPTS = 5

P = ParamSpec("P")
R = TypeVar("R")


def _on_fresh_state(
    operation: Callable[Concatenate[PlannerService, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[PlannerService, P], Coroutine[Any, Any, R]]:
    """Re-run `operation` from a fresh read when its write lost a race (`PlanConflictError`).

    Every write is a compare-and-set on the stored plan, so the rules of the operation are applied again
    to the state that won: a reject that lost to an execute then says the plan is executing.
    """

    @functools.wraps(operation)
    async def wrapper(self: PlannerService, /, *args: P.args, **kwargs: P.kwargs) -> R:
        for _ in range(_CONFLICT_ATTEMPTS - 1):
            try:
                return await operation(self, *args, **kwargs)
            except PlanConflictError:
                log.debug("%s lost a race; retrying on the stored state", operation.__name__)
        return await operation(self, *args, **kwargs)

    return wrapper


class PlannerService:
    """Create, approve, execute, resume, cancel and inspect plans over a store and a tool provider.

    Use it as an async context manager. Without `launcher` it runs an in-process runner for its own runs
    (the library, tests, the foreground `mcp-planner run`); they are cut short when it exits, left
    `executing`, and resumable. With a launcher, runs go to runner processes that outlive it.

    Args:
        store: where plans, events, execution claims and the run queue live.
        tools: the tools steps call (downstream MCP servers, or in-process tools); used to validate plans,
            and to execute them when there is no launcher.
        approval: the approval policy the MCP server applies (`auto`, `agent` or `human`); the service
            only records it, `approve_plan` records whatever approval the caller obtained.
        owner: this process's claim owner id (default: host, pid and a nonce).
        stale_after: seconds after which a claim whose heartbeat stopped is taken as dead.
        ready_timeout: how long the first operation that needs the tool catalog waits for the tool
            provider's initial connections (`tools.wait_ready`, when it has one).
        launcher: starts runner processes on demand (`runner.DetachedRunners`); None: run in-process.
    """

    def __init__(
        self,
        store: QueueStore,
        tools: ToolProvider,
        *,
        approval: ApprovalPolicy | str = "auto",
        owner: str | None = None,
        stale_after: float = DEFAULT_STALE_AFTER,
        ready_timeout: float = 30.0,
        launcher: DetachedRunners | None = None,
        max_steps: int = MAX_STEPS,
    ) -> None:
        if approval not in APPROVAL_POLICIES:
            raise ValueError(f"approval policy must be one of {APPROVAL_POLICIES}, not {approval!r}")
        self.store = store
        self.tools = with_builtins(tools)
        self.approval: ApprovalPolicy = approval  # type: ignore[assignment]
        self.owner = owner or new_owner_id()
        self.stale_after = stale_after
        self.ready_timeout = ready_timeout
        self.max_steps = max_steps
        self._ready = False
        self._launcher = launcher
        #: Runs submitted here without a launcher carry a key only this process's runner serves.
        self._local_key = local_key(self.owner)
        from mcp_planner.engine.executor import Executor  # the engine loads with the service, not the server

        self._executor = Executor(
            self.tools, store, owner=self.owner, stale_after=stale_after, max_steps=max_steps
        )
        self._runner: Runner | None = None
        self._changed = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        if self._launcher is None:
            self._runner = Runner(
                self.store,
                self.tools,
                servers=self._local_key,
                owner=self.owner,
                stale_after=self.stale_after,
                on_change=self._wake,
                max_steps=self.max_steps,
            )
            await self._tg.start(self._runner.serve)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            self._tg = None

    @property
    def runs_in_process(self) -> bool:
        """Whether this process executes the runs it submits (else runner processes do)."""
        return self._launcher is None

    # -- the tool catalog --------------------------------------------------------------------------------

    async def catalog(self) -> dict[str, ToolInfo]:
        """The tools steps can call now, by qualified name (waits once for the initial connections)."""
        await self._tools_ready()
        return dict(self.tools.catalog())

    def server_status(self) -> dict[str, ServerStatus]:
        """Each downstream server's status by name, when the tool provider reports one (else empty)."""
        if not isinstance(self.tools, StatusReporter):
            return {}
        try:
            return dict(self.tools.status())
        except Exception:  # a status report must never break the caller
            log.exception("tool provider status() failed")
            return {}

    async def _tools_ready(self) -> None:
        if self._ready:
            return
        wait_ready = getattr(self.tools, "wait_ready", None)
        if callable(wait_ready):
            try:
                await wait_ready(self.ready_timeout)
            except Exception:  # slow or failed servers are reported by status(); the rest still work
                log.info("not every downstream server was ready after %.0f s", self.ready_timeout)
        self._ready = True

    # -- creating and changing plans -----------------------------------------------------------------

    async def create_plan(
        self,
        spec: PlanSpec,
        values: Mapping[str, Any] | None = None,
        *,
        created_by: str = "agent",
        plan_id: str | None = None,
    ) -> ExecutionPlan:
        """Validate and store a plan a caller wrote, with the values of its inputs (checked against its
        `inputs` schema, defaults filled in); it starts `pending_approval` or auto-`approved`.

        Bare tool names are qualified (`server.tool`) when exactly one server offers them; dependencies
        are inferred from `{{ steps.<id> }}` references. `plan_id`: the id to store it under (default: a
        new one).

        Raises:
            PlanValidationError: with every problem; nothing is stored.
            PlanConflictError: a plan with `plan_id` exists.
        """
        plan = ExecutionPlan.from_spec(spec, values)
        if plan_id is not None:  # the id a caller already showed (`mcp-planner run`)
            plan.id = plan_id
        await self._check(plan)
        return await self._store_new(plan, source="create_plan", by=created_by)

    async def add_plan(self, plan: ExecutionPlan, *, source: str = "generate_plan") -> ExecutionPlan:
        """Store a plan built elsewhere (the generator), validated like `create_plan`.

        Raises:
            PlanValidationError: with every problem; nothing is stored.
        """
        await self._check(plan)
        return await self._store_new(plan, source=source, by=source)

    @_on_fresh_state
    async def update_plan(
        self,
        plan_id: str,
        description: str | None = None,
        steps: Sequence[StepSpec] | None = None,
        options: ExecutionOptions | None = None,
        *,
        inputs: Mapping[str, Any] | None = None,
        outputs: Mapping[str, str] | None = None,
        input_values: Mapping[str, Any] | None = None,
        updated_by: str = "agent",
    ) -> ExecutionPlan:
        """Replace parts of a plan that has not started; any approval is cleared (the hash changes).

        `inputs` replaces the inputs schema, `outputs` the outputs (`{}`: none), `input_values` all the
        values (checked against the schema, its defaults filling the rest). Without `input_values` the
        values are kept, except those that were only the old schema's defaults: a new schema's apply.

        Raises:
            PlanNotFoundError: no such plan.
            PlanStateError: the plan has started or ended.
            PlanValidationError: the updated plan has problems; the stored plan is unchanged.
        """
        plan = await self._load(plan_id)
        if plan.status not in _NOT_STARTED:
            raise PlanStateError(
                f"plan {plan.id!r} is {plan.status.value}: only a plan that has not started can be updated; "
                "create a new plan instead"
            )
        specs = [StepSpec.from_step(s) for s in plan.steps] if steps is None else steps
        metadata = {k: v for k, v in plan.metadata.items() if k != "approval_method"}
        spec = PlanSpec(
            description=plan.description if description is None else description,
            steps=list(specs),
            options=plan.options if options is None else options,
            inputs=plan.inputs if inputs is None else dict(inputs),
            outputs=plan.outputs if outputs is None else dict(outputs),
            metadata=metadata,
        )
        values = input_values
        if values is None:
            values = plan.input_values if inputs is None else _given_values(plan)
        updated = ExecutionPlan.from_spec(spec, values)
        updated.id = plan.id
        updated.created_at = plan.created_at
        updated.revision = plan.revision
        await self._check(updated)
        self._apply_policy(updated)
        updated.submit()
        fields = {
            "description": description,
            "steps": steps,
            "options": options,
            "inputs": inputs,
            "outputs": outputs,
            "input_values": input_values,
        }
        changed = [name for name, value in fields.items() if value is not None]
        events = [
            _event(
                updated,
                "plan_updated",
                by=updated_by,
                fields=changed,
                approval_cleared=plan.user_approved,
                status=updated.status.value,
            )
        ]
        if updated.status == PlanStatus.APPROVED:
            events.append(_event(updated, "plan_approved", by="auto", method="auto"))
        await self.store.save_plan(updated, events)
        return updated

    async def _check(self, plan: ExecutionPlan) -> None:
        from mcp_planner.plan.validation import qualify_tool_names

        catalog = await self.catalog()
        qualify_tool_names(plan, catalog.keys())
        problems = plan.validate(schema_catalog(self.tools), max_steps=self.max_steps)
        if problems:
            raise PlanValidationError(problems + self.unreachable_problems(problems))

    def warnings(self, plan: ExecutionPlan) -> list[Problem]:
        """What is worth saying about a valid plan: parameters its tools' schemas do not declare."""
        from mcp_planner.plan.validation import parameter_warnings

        return parameter_warnings(plan, schema_catalog(self.tools))

    def unreachable_problems(self, problems: list[Problem]) -> list[Problem]:
        """A problem per downstream server that is not connected, when `problems` has a tool not found."""
        if not any(p.field == "tool_name" for p in problems):
            return []
        extra = []
        for name, status in sorted(self.server_status().items()):
            if status.error is not None:
                extra.append(
                    Problem(
                        None,
                        "servers",
                        f"downstream server {name!r} is unreachable ({status.error}); its tools are "
                        "unavailable until it connects: check its entry in the servers file",
                    )
                )
        return extra

    def person_required(self, plan: ExecutionPlan) -> bool:
        """Only a person may approve `plan`: the `human` policy, or a person saw an earlier version."""
        return self.approval == "human" or plan.needs_person

    def _apply_policy(self, plan: ExecutionPlan) -> None:
        # Where only a person approves, a plan cannot opt out of approval (an edit cannot escape them).
        if self.person_required(plan) and not plan.options.needs_approval:
            plan.options.require_approval = True
            plan.options.auto_approve = False
            plan.metadata = {**plan.metadata, "approval_required_by_policy": True}

    async def _store_new(self, plan: ExecutionPlan, *, source: str, by: str) -> ExecutionPlan:
        self._apply_policy(plan)
        plan.submit()
        events = [_event(plan, "plan_created", by=by, source=source, steps=len(plan.steps))]
        if plan.status == PlanStatus.APPROVED:
            events.append(_event(plan, "plan_approved", by="auto", method="auto"))
        await self.store.save_plan(plan, events)
        return plan

    # -- approval --------------------------------------------------------------------------------------

    @_on_fresh_state
    async def approve_plan(
        self,
        plan_id: str,
        approved_by: str = "agent",
        method: str = "agent",
        *,
        note: str | None = None,
        expected_hash: str | None = None,
    ) -> ExecutionPlan:
        """Approve a `draft` or `pending_approval` plan, pinning its hash; `method` says how it was obtained.

        `expected_hash` is the hash of the plan as the approver saw it (required when a person approves,
        `method` in `PERSON_METHODS`): a plan edited since is not approved.

        Raises:
            PlanNotFoundError: no such plan.
            PlanChangedError: the plan changed since the approver saw it; show it again.
            PlanStateError: the plan is in another status, its approval timed out, or only a person may
                approve it and `method` is not a person's.
        """
        person = method in PERSON_METHODS
        if person and expected_hash is None:
            raise ValueError("a person's approval must name the hash of the plan they were shown")
        plan = await self._load(plan_id)
        if plan.status == PlanStatus.APPROVED and plan.is_approved():
            if expected_hash is not None and plan.plan_hash != expected_hash:
                raise PlanChangedError(f"plan {plan.id!r} changed since it was shown: {_SHOW_AGAIN}")
            return plan
        if plan.status == PlanStatus.CANCELLED:
            why = plan.rejection_note or plan.error or "cancelled"
            raise PlanStateError(
                f"plan {plan.id!r} is cancelled ({why}) and can no longer be approved: create a new plan"
            )
        if expected_hash is not None and plan.compute_hash() != expected_hash:
            raise PlanChangedError(f"plan {plan.id!r} changed while it was being approved: {_SHOW_AGAIN}")
        if not person and self.person_required(plan) and plan.status in _NOT_STARTED:
            why = "approval policy 'human'" if self.approval == "human" else "a person saw an earlier version"
            raise PlanStateError(
                f"plan {plan.id!r} needs a person's approval ({why}) and this client cannot ask them: ask "
                f"the user to run `mcp-planner approve {plan.id}` in a terminal, then call execute_plan"
            )
        plan.approve(approved_by, method=method)
        extra = {"note": note} if note else {}
        await self.store.save_plan(
            plan, [_event(plan, "plan_approved", by=approved_by, method=method, **extra)]
        )
        return plan

    @_on_fresh_state
    async def note_person_asked(self, plan_id: str) -> None:
        """Record that a person is being asked about the plan: from now on only a person approves it."""
        plan = await self._load(plan_id)
        if plan.needs_person or plan.status not in _NOT_STARTED:
            return
        plan.mark_person_involved()
        await self.store.save_plan(plan, [_event(plan, "person_asked")])

    @_on_fresh_state
    async def reject_plan(self, plan_id: str, reason: str, *, rejected_by: str = "agent") -> ExecutionPlan:
        """Reject a plan that has not started: it becomes `cancelled` and can never run.

        Raises:
            PlanNotFoundError: no such plan.
            PlanStateError: the plan has started or ended.
        """
        plan = await self._load(plan_id)
        plan.reject(reason)
        for step in plan.steps:
            if step.status == StepStatus.PENDING:
                step.status = StepStatus.SKIPPED
                step.error = f"not run: plan rejected ({reason})"
        await self.store.save_plan(plan, [_event(plan, "plan_rejected", by=rejected_by, reason=reason)])
        return plan

    # -- execution -------------------------------------------------------------------------------------

    @_on_fresh_state
    async def execute_plan(
        self,
        plan_id: str,
        wait_seconds: float | None = 50.0,
        on_progress: ProgressCallback | None = None,
        *,
        submitted_by: str = "agent",
    ) -> PlanSummary:
        """Submit a run of an approved plan; return its summary when it ends or after `wait_seconds`.

        The run is a committed row in the store that a runner executes: it goes on whether or not the caller
        keeps waiting, or even lives (`None`: wait to the end). While the caller waits, `on_progress` is
        called with the plan's progress (counts, and the events since the last call) as steps move.

        Raises:
            PlanNotFoundError: no such plan.
            PlanStateError: not approved, changed since approval, already executing or submitted, or ended;
                or the runner refused it (the message says why).
            PlanValidationError: it no longer validates against the tool catalog.
        """
        request = await self._execute_request(plan_id, submitted_by)
        return await self._submit_and_follow(request, wait_seconds, on_progress)

    @_on_fresh_state
    async def submit_execute(self, plan_id: str, *, submitted_by: str = "agent") -> RunRecord:
        """Submit a run of an approved plan and return the stored run at once, for a caller that follows it
        by itself (an MCP task). Raises as `execute_plan` does before its run is submitted."""
        run, _ = await self._submit(await self._execute_request(plan_id, submitted_by))
        return run

    async def _execute_request(self, plan_id: str, submitted_by: str) -> RunRequest:
        plan = await self._load(plan_id)
        await self._refuse_if_claimed(plan)
        check_can_execute(plan)
        await self._tools_ready()
        problems = plan.validate(schema_catalog(self.tools), max_steps=self.max_steps)
        if problems:
            raise PlanValidationError(problems + self.unreachable_problems(problems), "the plan cannot run")
        return RunRequest(plan_id=plan.id, kind=RunKind.EXECUTE, submitted_by=submitted_by)

    @_on_fresh_state
    async def resume_plan(
        self,
        plan_id: str,
        rerun_interrupted: bool = False,
        wait_seconds: float | None = 50.0,
        on_progress: ProgressCallback | None = None,
        *,
        submitted_by: str = "agent",
    ) -> PlanSummary:
        """Submit a run that resumes a `failed` or `partial` plan, or one left `executing` by a dead process.

        Completed steps are kept; the rest run again. A step interrupted mid-call is re-run only when that is
        safe or `rerun_interrupted` is true. Resuming a `completed` plan returns its summary.

        Raises:
            PlanNotFoundError: no such plan.
            PlanStateError: the plan never ran, is cancelled, or is executing in a live process.
        """
        request = await self._resume_request(plan_id, rerun_interrupted, submitted_by)
        if request is None:
            return (await self._load(plan_id)).summary()
        return await self._submit_and_follow(request, wait_seconds, on_progress)

    @_on_fresh_state
    async def submit_resume(
        self, plan_id: str, rerun_interrupted: bool = False, *, submitted_by: str = "agent"
    ) -> RunRecord | None:
        """Submit a run resuming the plan and return the stored run at once (None: a completed plan, nothing
        to resume). Raises as `resume_plan` does before its run is submitted."""
        request = await self._resume_request(plan_id, rerun_interrupted, submitted_by)
        if request is None:
            return None
        run, _ = await self._submit(request)
        return run

    async def _resume_request(
        self, plan_id: str, rerun_interrupted: bool, submitted_by: str
    ) -> RunRequest | None:
        plan = await self._load(plan_id)
        if not check_can_resume(plan):
            return None
        await self._refuse_if_claimed(plan)
        await self._tools_ready()
        return RunRequest(
            plan_id=plan.id,
            kind=RunKind.RESUME,
            rerun_interrupted=rerun_interrupted,
            submitted_by=submitted_by,
        )

    async def _refuse_if_claimed(self, plan: ExecutionPlan) -> None:
        if plan.status == PlanStatus.EXECUTING:
            claim = await self.store.get_claim(plan.id)
            if claim is not None and claim_is_live(claim, utcnow(), self.stale_after):
                raise PlanClaimedError(plan.id, claim.owner)

    async def _submit_and_follow(
        self, request: RunRequest, wait_seconds: float | None, on_progress: ProgressCallback | None
    ) -> PlanSummary:
        run, since = await self._submit(request)
        return await self._follow(run, wait_seconds, on_progress, since)

    async def _submit(self, request: RunRequest) -> tuple[RunRecord, int]:
        """The committed run, and the plan's newest event `seq` before it (what the run does comes after)."""
        request.servers = await self._servers_key()
        await reclaim_orphans(self.store, self.stale_after)  # a dead runner's run must not block this one
        since = (await self.store.progress(request.plan_id)).seq
        run = await self.store.submit_run(request)
        if self._launcher is not None:
            try:
                await self._launcher.ensure(self.store, request.servers)
            except OSError as exc:
                log.error("could not start a runner: %s", exc)
        return run, since

    async def _follow(
        self,
        run: RunRecord,
        wait_seconds: float | None,
        on_progress: ProgressCallback | None,
        since: int | None = None,
    ) -> PlanSummary:
        """Watch the stored plan until its run is done or `wait_seconds` pass; report progress on the way.

        Each look reads the plan's status, step counts and the events since the last look, never the
        plan's steps, so following costs per change, not per step. Progress reports the events after
        `since` (default: from now). A caller that stops waiting early still learns of a refusal: it waits
        (bounded) until a runner has taken the run and started it, or refused it.
        """
        deadline = math.inf if wait_seconds is None else anyio.current_time() + max(wait_seconds, 0)
        start_by = anyio.current_time() + START_WAIT
        seen = (await self.store.progress(run.plan_id)).seq if since is None else since
        first = True
        while True:
            current = await self.store.get_run(run.id)
            progress = await self.store.progress(run.plan_id, seen if on_progress is not None else None)
            seen = progress.last_seen
            if on_progress is not None and (first or progress.events):
                await _report(on_progress, progress)
            first = False
            if progress.seq > seen:
                continue  # more events are waiting: report them before anything else
            if current.state == RunState.DONE:
                if current.error is not None:
                    raise PlanStateError(current.error)
                return await self.get_summary(run.plan_id)
            if current.state == RunState.QUEUED and self._launcher is not None:
                await self._check_runner_started(run)
            now = anyio.current_time()
            started = current.state == RunState.CLAIMED and progress.status == PlanStatus.EXECUTING
            if now >= deadline and (started or now >= start_by):
                return await self.get_summary(run.plan_id)
            poll = FOLLOW_POLL_S if on_progress is None else PROGRESS_POLL_S
            await self._wait_for_change(min(poll, max(deadline - now, 0.0) or poll))

    async def _check_runner_started(self, run: RunRecord) -> None:
        """Refuse to wait on a queued run whose runner, started here, died before taking it: the run is
        withdrawn (done, with the reason as its error)."""
        assert self._launcher is not None
        if self._launcher.started_runner_died() and not await self.store.live_runners(run.servers):
            reason = (
                f"the runner started to execute plan {run.plan_id!r} exited before it could: see "
                f"{str(self._launcher.log_path)!r}; the plan was not run"
            )
            await self.store.cancel_queued_run(run.plan_id, reason)
            raise PlanStateError(reason)

    async def tend_queued_run(self, run: RunRecord) -> None:
        """For someone polling a queued run (a task): withdraw it if the runner started here died before
        taking it, and start a runner if none is live for it and this process can start one for its
        servers file (the process that submitted it may be gone)."""
        if self._launcher is None or run.state != RunState.QUEUED:
            return
        try:
            await self._check_runner_started(run)
        except PlanStateError:
            return
        if run.servers == await self._servers_key():
            try:
                await self._launcher.ensure(self.store, run.servers)
            except OSError as exc:
                log.error("could not start a runner: %s", exc)

    async def _wait_for_change(self, seconds: float) -> None:
        if self._runner is not None:
            with anyio.move_on_after(seconds):  # the in-process runner says when a run is done
                await self._changed.wait()
            return
        await self.store.wait_for_work(seconds)  # a runner elsewhere committed something
        # Coalesce a burst of steps into one look: following a plan costs per interval, not per step.
        await anyio.sleep(PROGRESS_COALESCE_S)

    def _wake(self, *_: Any) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _servers_key(self) -> str | None:
        if self._launcher is not None:
            return await anyio.to_thread.run_sync(self._launcher.key)
        return self._local_key

    @_on_fresh_state
    async def cancel_plan(
        self, plan_id: str, reason: str = "cancelled", *, cancelled_by: str = "agent"
    ) -> PlanSummary:
        """Cancel a plan: a queued run is withdrawn, an executing one stopped by its runner (which sees the
        request within a fraction of a second), and a plan that is not running is marked `cancelled`.

        Raises:
            PlanNotFoundError: no such plan.
            PlanStateError: the plan is already completed or cancelled.
        """
        plan = await self._load(plan_id)
        if plan.status in (PlanStatus.COMPLETED, PlanStatus.CANCELLED):
            raise PlanStateError(f"plan {plan.id!r} is {plan.status.value}: there is nothing to cancel")
        await self.store.cancel_queued_run(plan.id, f"cancelled before it started: {reason}")
        summary = await self._executor.cancel(plan, reason, by=cancelled_by)
        if summary.status != PlanStatus.EXECUTING:
            return summary
        run = await self.store.active_run(plan.id)  # stopped by its runner: wait (bounded) for the end
        if run is not None:
            with anyio.move_on_after(CANCEL_WAIT):
                summary = await self._follow(run, None, None)
        return summary

    # -- reading ---------------------------------------------------------------------------------------

    async def get_plan(self, plan_id: str) -> ExecutionPlan:
        """Raises: PlanNotFoundError."""
        return await self._load(plan_id)

    async def get_summary(self, plan_id: str) -> PlanSummary:
        """The summary listing the `SUMMARY_STEPS` steps that need attention first, read without reading the
        whole plan (but for one waiting for approval, which may have timed out).

        Raises: PlanNotFoundError.
        """
        summary = await self.store.summary(plan_id, SUMMARY_STEPS)
        if summary.status == PlanStatus.PENDING_APPROVAL:
            return (await self._load(plan_id)).summary(SUMMARY_STEPS)
        return summary

    async def list_plans(
        self, status: PlanStatus | str | None = None, limit: int = 20
    ) -> list[ExecutionPlan]:
        """Recent plans, newest first, optionally only those in `status`."""
        plans = await self.store.list_plans(status=status, limit=limit)
        result = []
        for plan in plans:
            try:
                expired = await self._executor.expire(plan)
            except PlanConflictError:  # changed meanwhile: list it as it is now
                plan, expired = await self.store.get_plan(plan.id), True
            if expired and status is not None and plan.status != PlanStatus(status):
                continue
            result.append(plan)
        return result

    async def events(self, plan_id: str) -> list[Event]:
        """The plan's audit trail, oldest first. Raises: PlanNotFoundError."""
        await self.store.get_plan(plan_id)
        return await self.store.events(plan_id)

    async def runners(self) -> list[RunnerInfo]:
        """The live runners serving this database."""
        return await self.store.live_runners(stale_after=self.stale_after)

    async def _load(self, plan_id: str) -> ExecutionPlan:
        plan = await self.store.get_plan(plan_id)
        await self._executor.expire(plan)
        return plan


# -- helpers --------------------------------------------------------------------------------------------


async def _report(on_progress: ProgressCallback, progress: PlanProgress) -> None:
    try:
        with anyio.move_on_after(LISTENER_WAIT):  # a slow client must not stall the follower
            result = on_progress(progress)
            if inspect.isawaitable(result):
                await result
    except Exception:  # a listener that fails (a client gone) does not stop the run, which is elsewhere
        log.debug("progress listener failed", exc_info=True)


def _given_values(plan: ExecutionPlan) -> dict[str, Any]:
    """The plan's input values without those that are only its schema's defaults."""
    properties = (plan.inputs or {}).get("properties")
    defaults = {}
    if isinstance(properties, dict):
        defaults = {n: p["default"] for n, p in properties.items() if isinstance(p, dict) and "default" in p}
    return {n: v for n, v in plan.input_values.items() if n not in defaults or defaults[n] != v}


_SHOW_AGAIN = "it was not approved; show the current version to the person and ask again"


def _event(plan: ExecutionPlan, kind: str, **data: Any) -> Event:
    return Event(plan_id=plan.id, kind=kind, data=data)
