"""One exception tree for the planner.

    PlannerError
    ├── PlanValidationError      a plan has problems (carries every one of them)
    ├── PlanNotFoundError        unknown plan id
    ├── RunNotFoundError         unknown run id (the run queue)
    ├── PlanStateError           the plan's status does not allow the operation
    │   ├── PlanClaimedError     another live executor owns the plan
    │   ├── PlanConflictError    someone else changed the stored plan since it was read
    │   └── PlanChangedError     the plan is not what the approver was shown
    ├── ConfigError              a bad servers file (names file, server and field)
    ├── GenerationError          the LLM never produced a valid plan, or cannot be asked
    └── StepError                one attempt of one step failed
        ├── ToolNotFoundError    no such tool (not retried)
        ├── TemplateError        a parameter template failed to render (not retried)
        ├── ParameterError       rendered parameters break the tool's schema (not retried)
        ├── LLMNotConfiguredError  `planner.llm` was called with no LLM provider (not retried)
        ├── ToolCallError        the tool answered with an error (retried)
        ├── DownstreamError      transport failure, dead or unreachable server (retried)
        └── StepTimeoutError     an attempt ran past its timeout (retried)

Whether a step error is retried is a property of its class (`retryable`), so the retry policy never
inspects messages. Third-party exceptions are translated into this tree once, at the module that talks to
the third party.
"""

from __future__ import annotations

from dataclasses import dataclass


class PlannerError(Exception):
    """Root of every error the planner raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a plan: which step (None for the plan itself), which field, what."""

    step_id: str | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"step {self.step_id!r}" if self.step_id is not None else "plan"
        return f"{where}, {self.field}: {self.message}"


class PlanValidationError(PlannerError):
    """The plan was refused; `problems` lists every reason at once."""

    def __init__(self, problems: list[Problem], message: str = "the plan is invalid") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"- {p}" for p in self.problems)
        super().__init__(f"{message} ({len(self.problems)} problem(s)):\n{lines}")


class PlanNotFoundError(PlannerError):
    def __init__(self, plan_id: str) -> None:
        self.plan_id = plan_id
        super().__init__(f"no plan with id {plan_id!r}: call list_plans to see the plans that exist")


class RunNotFoundError(PlannerError):
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"no run with id {run_id!r}: call get_summary on its plan to see how it went")


class PlanStateError(PlannerError):
    """The operation is not allowed in the plan's current status."""


class PlanClaimedError(PlanStateError):
    def __init__(self, plan_id: str, owner: str) -> None:
        self.plan_id = plan_id
        self.owner = owner
        super().__init__(
            f"plan {plan_id!r} is already executing in another process ({owner}); "
            "wait for it, or call get_summary to follow it"
        )


class PlanConflictError(PlanStateError):
    """A compare-and-set write lost: the stored plan changed since this copy of it was read."""

    def __init__(self, plan_id: str) -> None:
        self.plan_id = plan_id
        super().__init__(
            f"plan {plan_id!r} was changed by another call or process meanwhile: read it again (get_plan) "
            "and retry"
        )


class PlanChangedError(PlanStateError):
    """An approval named content (a hash) that the plan no longer has: the person must see it again."""


class ConfigError(PlannerError):
    """A servers config file is unreadable or malformed."""


class GenerationError(PlannerError):
    """Plan generation failed; `problems` holds the last validation problems, if any."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        self.problems = list(problems or [])
        if self.problems:
            message += "\n" + "\n".join(f"- {p}" for p in self.problems)
        super().__init__(message)


class StepError(PlannerError):
    """One attempt of a step failed."""

    retryable: bool = True


class ToolNotFoundError(StepError):
    retryable = False


class TemplateError(StepError):
    retryable = False


class ParameterError(StepError):
    retryable = False


class LLMNotConfiguredError(StepError):
    """`planner.llm` was called but this planner has no LLM provider to ask."""

    retryable = False


class ToolCallError(StepError):
    """The downstream tool returned `isError: true`; the message is the tool's own text."""


class DownstreamError(StepError):
    """The downstream server could not be reached, died, or broke the protocol."""


class StepTimeoutError(StepError):
    pass


class CheckFailedError(StepError):
    """The step's `fail_if` check held on an attempt's result: retried like a downstream error."""
