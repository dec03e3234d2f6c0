"""Who may start or resume a plan, and the one wording of each refusal.

The executor applies these rules when it runs a plan; the service applies the same ones when a run is
submitted, so an agent hears a refusal at once, in the same words. No I/O, and cheap to import.
"""

from __future__ import annotations

from mcp_planner.errors import PlanStateError
from mcp_planner.plan.model import ExecutionPlan, PlanStatus


def check_can_execute(plan: ExecutionPlan) -> None:
    """Refuse, with what to do instead, a plan that may not start executing now.

    Raises:
        PlanStateError: not approved, changed since approval, executing, or already run.
    """
    pid, status = plan.id, plan.status
    if status == PlanStatus.EXECUTING:
        raise PlanStateError(
            f"plan {pid!r} is already executing: call get_summary to follow it (if the process running it "
            "died, call resume_plan)"
        )
    if status in (PlanStatus.FAILED, PlanStatus.PARTIAL):
        raise PlanStateError(
            f"plan {pid!r} has already run and is {status.value}: call resume_plan to run its failed and "
            "skipped steps again"
        )
    if status == PlanStatus.COMPLETED:
        raise PlanStateError(f"plan {pid!r} has already completed: call get_plan to read its results")
    if status == PlanStatus.CANCELLED:
        raise PlanStateError(_cancelled_message(plan))
    if status == PlanStatus.PENDING_APPROVAL or (status == PlanStatus.DRAFT and plan.options.needs_approval):
        raise PlanStateError(f"plan {pid!r} is {status.value}: call approve_plan first")
    if status == PlanStatus.APPROVED and not plan.is_approved():
        raise PlanStateError(
            f"plan {pid!r} was changed after it was approved (its hash no longer matches): have it "
            "approved again before executing"
        )


def check_can_resume(plan: ExecutionPlan) -> bool:
    """Whether resuming `plan` has work to do (False: it completed); refuse a plan that cannot resume.

    Raises:
        PlanStateError: cancelled, never ran, or changed since approval.
    """
    status = plan.status
    if status == PlanStatus.COMPLETED:
        return False
    if status == PlanStatus.CANCELLED:
        raise PlanStateError(_cancelled_message(plan) + "; cancelled plans cannot be resumed")
    if status not in (PlanStatus.FAILED, PlanStatus.PARTIAL, PlanStatus.EXECUTING):
        hint = "call approve_plan, then execute_plan" if plan.options.needs_approval else "call execute_plan"
        if status == PlanStatus.APPROVED:
            hint = "call execute_plan"
        raise PlanStateError(f"plan {plan.id!r} is {status.value} and has never run: {hint}")
    if not plan.is_approved():
        raise PlanStateError(
            f"plan {plan.id!r} was changed after it was approved (its hash no longer matches): it cannot "
            "be resumed; create a new plan with the changes"
        )
    return True


def _cancelled_message(plan: ExecutionPlan) -> str:
    if plan.rejection_note is not None:
        why = f" (rejected: {plan.rejection_note})"
    else:
        why = f" ({plan.error})" if plan.error else ""
    return f"plan {plan.id!r} is cancelled{why} and can never run: create a new plan to run these steps"
