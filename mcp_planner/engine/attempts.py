"""One step's call: rendered parameters checked against the tool's schema, then attempts, each bounded by the
step's timeout and retried by the one retry policy.

Whether an error is retried is a property of its class (`StepError.retryable`); nothing here reads messages.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential

from mcp_planner.engine.tools import ToolInfo, ToolProvider
from mcp_planner.errors import ParameterError, StepError, StepTimeoutError, ToolCallError
from mcp_planner.plan.model import Step, StepResult
from mcp_planner.plan.validation import compiled_validator

logger = logging.getLogger("mcp_planner.engine.executor")

#: Called before each retry with (retry number, the error, seconds until the retry); awaited before it.
OnRetry = Callable[[int, str, float], Awaitable[None]]
#: Called with each attempt's result; raises a `StepError` to fail that attempt (`fail_if`).
Check = Callable[[StepResult], Awaitable[None]]


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, StepError) and exc.retryable


def retry_policy(step: Step, backoff: float, before_sleep: Callable[[RetryCallState], Any]) -> AsyncRetrying:
    """The one place retries are configured: from the step's fields and the plan's backoff.

    Attempts: `max_retries + 1`. Wait before retry n: `retry_delay_ms * backoff ** (n - 1)`. Only
    `StepError`s whose class is `retryable` are retried; anything else (cancellation included) re-raises.
    """
    return AsyncRetrying(
        stop=stop_after_attempt(step.max_retries + 1),
        wait=wait_exponential(multiplier=step.retry_delay_ms / 1000, exp_base=backoff, min=0),
        retry=retry_if_exception(_is_retryable),
        sleep=anyio.sleep,
        before_sleep=before_sleep,
        reraise=True,
    )


def check_parameters(step: Step, info: ToolInfo | None, params: dict[str, Any]) -> None:
    """Check rendered parameters against the tool's input schema (compiled once per process).

    Raises:
        ParameterError: naming the step, the tool and what does not match.
    """
    schema = info.input_schema if info is not None else None
    validator = compiled_validator(schema) if schema else None
    if validator is None:
        return
    errors = sorted(validator.iter_errors(params), key=lambda e: list(e.absolute_path))
    if errors:
        details = "; ".join(
            f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:5]
        )
        raise ParameterError(
            f"rendered parameters of step {step.id!r} do not match the input schema of "
            f"{step.tool_name!r}: {details}"
        )


async def call_step(
    provider: ToolProvider,
    step: Step,
    params: dict[str, Any],
    *,
    step_timeout_ms: int,
    backoff: float,
    on_retry: OnRetry,
    check: Check | None = None,
) -> StepResult:
    """Call the step's tool until an attempt succeeds (and passes `check`) or the retry policy gives up.

    Raises:
        StepError: the last attempt's error (`StepTimeoutError` for an attempt past its timeout).
    """
    timeout_ms = step.timeout_ms or step_timeout_ms

    async def attempt() -> StepResult:
        try:
            if timeout_ms and timeout_ms > 0:
                with anyio.fail_after(timeout_ms / 1000):
                    result = await provider.call(step.tool_name, params)
            else:
                result = await provider.call(step.tool_name, params)
        except TimeoutError as exc:
            raise StepTimeoutError(
                f"step {step.id!r}: the call to {step.tool_name!r} timed out (attempt timeout of "
                f"{timeout_ms} ms exceeded)"
            ) from exc
        except StepError:
            raise
        except Exception as exc:  # a provider broke its contract: treat it as the tool failing
            raise ToolCallError(f"{type(exc).__name__}: {exc}") from exc
        result = result if isinstance(result, StepResult) else StepResult.from_value(result)
        if check is not None:
            await check(result)
        return result

    if step.max_retries <= 0:  # the policy would make exactly one attempt; skip its machinery
        return await attempt()

    async def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        await on_retry(state.attempt_number, str(exc), state.upcoming_sleep)

    result: StepResult = await retry_policy(step, backoff, before_sleep)(attempt)
    return result
