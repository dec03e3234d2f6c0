"""The one jinja2 environment of the package: sandboxed, and held to a time budget and an output cap.

jinja's sandbox closes the routes to Python internals; it does not stop a template from working forever or
from building a huge value (`{{ 'a' * 10**9 }}`, `'{:>1000000000}'.format(1)`, nested loops). Here:

- every sandbox hook (attribute, item, call, operator, filter, each loop step, each piece of output) checks
  the deadline that `time_budget` sets, so a render stops soon after its budget even on its own thread;
- operations that amplify their input (repetition, powers, padding, format widths and precisions, joins,
  replace, concatenation, buffered output) are refused *before* their result is built when it would pass
  `OUTPUT_CAP`; other results are measured after the fact, so nothing grows far past the cap unnoticed;
- globals and filters that only amplify or scan quadratically (`lipsum`, `urlize`, `striptags`) are gone.

Sizes are estimates of a value's text or JSON form, counted no further than just past the cap.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import re
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from itertools import islice
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.filters import make_attrgetter
from jinja2.runtime import Context
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Namespace

from mcp_planner.errors import TemplateError

#: Largest text (characters) or value (estimated JSON size) a template may produce.
OUTPUT_CAP = 1 << 20
#: Default wall-clock budget of one render.
TIME_BUDGET_S = 1.0
#: Largest integer a template may build: far past what can be printed (4300 digits), and small enough that
#: arithmetic on it stays quick (multiplying two 3-million-bit integers takes about a second).
MAX_INT_BITS = 100_000
#: Most lists `batch` or `slice` may make (as many as the items `range` may make).
MAX_ITEMS = MAX_RANGE

_BUDGET: ContextVar[Budget | None] = ContextVar("template_budget", default=None)
# Codecs whose cost is linear; others (punycode, idna) are quadratic on crafted input.
_CODECS = frozenset({"utf-8", "utf8", "ascii", "latin-1", "latin1", "utf-16", "utf-32"})
# Filters that do not turn their whole input into text, so a large input alone is no reason to refuse them.
_STRUCTURAL_FILTERS = frozenset(
    {
        "abs", "attr", "batch", "count", "d", "default", "dictsort", "first", "float", "groupby", "int",
        "items", "join", "last", "length", "list", "map", "max", "min", "random", "reject", "rejectattr",
        "reverse", "round", "select", "selectattr", "slice", "sort", "sum", "unique",
    }
)  # fmt: skip
_PRINTF = re.compile(
    r"%(?:\((?P<key>[^)]*)\))?[-#0 +]*(?P<width>\*|\d+)?(?:\.(?P<prec>\*|\d*))?[hlL]?(?P<conv>.)?"
)
_DIGITS = re.compile(r"\d+")


class Budget:
    """The time one render may take; `stop()` ends it early (its caller gave up on it)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


@contextlib.contextmanager
def time_budget(budget: Budget) -> Iterator[None]:
    """Templates rendered inside this block (in this thread or context) stop once `budget` is spent."""
    token = _BUDGET.set(budget)
    try:
        yield
    finally:
        _BUDGET.reset(token)


def check_deadline() -> None:
    budget = _BUDGET.get()
    if budget is None:
        return
    if budget.stopped:
        raise TemplateError("rendering was abandoned (the step was cancelled or timed out)")
    if time.monotonic() > budget.deadline:
        raise TemplateError(
            f"rendering took longer than the {budget.seconds:g} s template time budget;"
            " make the template do less work"
        )


def check_size(value: Any, what: str) -> None:
    """Refuse `value` if its text or JSON form would pass the cap."""
    check_length(size_of(value), what)


def _cap_text() -> str:
    return f"{OUTPUT_CAP // (1 << 20)} MiB" if OUTPUT_CAP % (1 << 20) == 0 else f"{OUTPUT_CAP} byte"


def check_length(size: int, what: str) -> None:
    """Refuse a result of `size` characters (or estimated JSON size) if it would pass the cap."""
    if size > OUTPUT_CAP:
        raise TemplateError(
            f"{what} would produce about {size} characters, over the {_cap_text()} template output cap;"
            " make the template produce less"
        )


class TextLike:
    """A template value that stands for a text: sized and printed as `str()` of it."""


def size_of(value: Any, limit: int = OUTPUT_CAP) -> int:
    """Estimated length of `value` as text or JSON; counting stops once past `limit`."""
    if isinstance(value, str | bytes):
        return len(value)
    total = 0
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str | bytes):
            total += len(item) + 2
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() * 30103 // 100000 + 2
        elif isinstance(item, float):
            total += 24
        elif isinstance(item, TextLike):
            total += len(str(item)) + 2
        elif isinstance(item, Mapping):
            total += 2
            for key, val in islice(item.items(), limit - total + 1):
                total += 2
                stack.append(key)
                stack.append(val)
        elif isinstance(item, list | tuple | set | frozenset):
            total += 2 + len(item)
            stack.extend(islice(item, limit - total + 1))
        else:
            total += 16
    return total


def _int_bits(value: Any) -> int:
    return value.bit_length() if isinstance(value, int) and not isinstance(value, bool) else 0


def _check_int(bits: int, what: str) -> None:
    if bits > MAX_INT_BITS:
        raise TemplateError(
            f"{what} would build an integer of about {bits} bits, over the {MAX_INT_BITS}-bit limit on"
            " template numbers; use smaller numbers"
        )


def _printf_size(fmt: str, args: Any) -> int:
    """Estimated length of `fmt % args`: its text, each conversion's width and precision, and its value."""
    positional = list(args) if isinstance(args, tuple) else [args]
    keyed = args if isinstance(args, Mapping) else None
    total, i = len(fmt), 0
    for match in _PRINTF.finditer(fmt):
        if match["conv"] in (None, "%"):
            continue
        for part in (match["width"], match["prec"]):
            if part == "*":
                star = positional[i] if i < len(positional) else 0
                total += abs(star) if isinstance(star, int) else 0
                i += 1
            elif part:
                total += int(part) if len(part) < 10 else OUTPUT_CAP + 1
        key = match["key"]
        if key is not None and keyed is not None:
            total += size_of(keyed.get(key))
        elif i < len(positional):
            total += size_of(positional[i])
            i += 1
        if total > OUTPUT_CAP:
            break
    return total


def _spec_width(spec: str) -> int:
    """Largest width or precision in a `str.format` spec (after nested fields are filled in)."""
    runs = _DIGITS.findall(spec)
    return max((int(r) if len(r) < 10 else OUTPUT_CAP + 1 for r in runs), default=0)


def checked_join(separator: str, items: Iterable[Any], what: str) -> str:
    parts: list[str] = []
    total = 0
    for item in items:
        check_deadline()
        if not isinstance(item, str):
            check_size(item, what)
            item = str(item)
        total += len(item) + len(separator)
        check_length(total, what)
        parts.append(item)
    return separator.join(parts)


def _check_str_method(
    text: str | bytes, what: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Refuse a str/bytes method call whose result would pass the cap, before it is made."""
    if name in ("center", "ljust", "rjust", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        if isinstance(width, int):
            check_length(max(len(text), width), what)
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        tabs = text.count("\t") if isinstance(text, str) else text.count(b"\t")
        if isinstance(size, int):
            check_length(len(text) + tabs * size, what)
    elif name == "replace" and len(args) >= 2:
        check_length(
            _replace_size(text, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1)), what
        )
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str | bytes)), default=1)
        check_length(len(text) * max(longest, 1), what)
    elif name in ("encode", "decode"):
        codec = args[0] if args else kwargs.get("encoding", "utf-8")
        if not isinstance(codec, str) or codec.lower().replace("_", "-") not in _CODECS:
            raise TemplateError(
                f"{what}: only the codecs {', '.join(sorted(_CODECS))} are allowed in templates"
            )


def _replace_size(text: Any, old: Any, new: Any, count: Any) -> int:
    length = size_of(text)
    if isinstance(text, str) and isinstance(old, str):
        hits = text.count(old) if old else len(text) + 1
    elif isinstance(text, bytes) and isinstance(old, bytes):
        hits = text.count(old) if old else len(text) + 1
    else:
        hits = length + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return length + hits * size_of(new)


class _Namespace(Namespace):
    """`namespace()`: assignments in loops are how a template accumulates, so each one is measured."""

    def __setitem__(self, name: str, value: Any) -> None:
        check_deadline()
        check_size(value, f"namespace attribute {name!r}")
        super().__setitem__(name, value)


class _Formatter(SandboxedFormatter):
    """`str.format` counting its output field by field, widths included, before each field is built."""

    def __init__(self, env: jinja2.Environment, what: str) -> None:
        super().__init__(env)
        self._what = what
        self._total = 0

    def format_field(self, value: Any, format_spec: str) -> Any:
        check_deadline()
        self._total += max(_spec_width(format_spec), size_of(value))
        check_length(self._total, self._what)
        return super().format_field(value, format_spec)


class _Buffer(list[Any]):
    """The output of a macro, a `set` block or a filter block, measured as it grows."""

    def __init__(self) -> None:
        super().__init__()
        self._size = 0

    def append(self, part: Any) -> None:
        check_deadline()
        self._size += size_of(part)
        check_length(self._size, "buffered output")
        super().append(part)

    def extend(self, parts: Iterable[Any]) -> None:
        for part in parts:
            self.append(part)


class _CodeGenerator(CodeGenerator):
    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        # `~` joins through the environment's measured `concat` rather than a plain str join.
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


@jinja2.pass_context
def _loop_guard(_context: Context, items: Iterable[Any]) -> Iterator[Any]:
    # A loop body may call no hook at all (`{% for i in range(n) %}{% endfor %}`): its iteration is one.
    for item in items:
        check_deadline()
        yield item


def _guarded(items: Iterable[Any], what: str) -> Iterator[Any]:
    total = 0
    for item in items:
        check_deadline()
        total += size_of(item)
        check_length(total, what)
        yield item


def _capped(result: Any, what: str) -> Any:
    """A lazy result is measured as it is consumed; any other at once."""
    if isinstance(result, Iterator) and not isinstance(result, str | bytes):
        return _guarded(result, what)
    check_size(result, what)
    return result


def _check_center(value: Any, width: Any = 80) -> None:
    if isinstance(width, int):
        check_length(max(size_of(value), width), "the 'center' filter")


def _check_indent(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> None:
    step = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    lines = s.count("\n") + 1 if isinstance(s, str) else size_of(s)
    check_length(size_of(s) + lines * step, "the 'indent' filter")


def _check_format(value: Any, *args: Any, **kwargs: Any) -> None:
    check_length(_printf_size(str(value), kwargs or args), "the 'format' filter")


def _check_replace(s: Any, old: Any, new: Any, count: Any = None) -> None:
    check_length(_replace_size(s, old, new, -1 if count is None else count), "the 'replace' filter")


def _check_wordwrap(
    s: Any,
    width: Any = 79,
    break_long_words: Any = True,
    wrapstring: Any = None,
    break_on_hyphens: Any = True,
) -> None:
    length = size_of(s)
    lines = length
    if isinstance(s, str) and isinstance(width, int) and width > 0:
        lines = min(length, 2 * length // width + s.count("\n") + 1)
    check_length(
        length + lines * (len(wrapstring) if isinstance(wrapstring, str) else 1), "the 'wordwrap' filter"
    )


def _check_batch(value: Any, linecount: Any, fill_with: Any = None) -> None:
    if fill_with is not None and isinstance(linecount, int) and linecount > MAX_ITEMS:
        raise TemplateError(f"the 'batch' filter may pad to at most {MAX_ITEMS} items, not {linecount}")


def _check_slice(value: Any, slices: Any, fill_with: Any = None) -> None:
    if isinstance(slices, int) and slices > MAX_ITEMS:
        raise TemplateError(f"the 'slice' filter may make at most {MAX_ITEMS} slices, not {slices}")


_FILTER_CHECKS: dict[str, Callable[..., None]] = {
    "center": _check_center,
    "indent": _check_indent,
    "format": _check_format,
    "replace": _check_replace,
    "wordwrap": _check_wordwrap,
    "batch": _check_batch,
    "slice": _check_slice,
}


def _limited_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    check = _FILTER_CHECKS.get(name)
    stringifies = name not in _STRUCTURAL_FILTERS
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # context/environment first
    what = f"the {name!r} filter"

    @functools.wraps(func)  # keeps jinja's pass_context/pass_environment marks
    def limited(*args: Any, **kwargs: Any) -> Any:
        check_deadline()
        if stringifies and len(args) > skip:
            check_size(args[skip], f"the input of {what}")
        if check is not None:
            check(*args[skip:], **kwargs)
        return _capped(func(*args, **kwargs), what)

    return limited


@jinja2.pass_environment
def _join(env: jinja2.Environment, value: Iterable[Any], d: Any = "", attribute: Any = None) -> str:
    if attribute is not None:
        value = map(make_attrgetter(env, attribute), value)
    return checked_join(str(d), value, "the 'join' filter")


@jinja2.pass_environment
def _sum(env: LimitedEnvironment, iterable: Iterable[Any], attribute: Any = None, start: Any = 0) -> Any:
    # Builtin `sum` over lists is one quadratic C call that checks nothing; this adds step by step.
    if attribute is not None:
        iterable = map(make_attrgetter(env, attribute), iterable)
    total = start
    for item in iterable:
        total = env.checked_add(total, item)
    return total


#: Most keys a missing-key error lists, and most it compares with the missing one for a suggestion.
_LISTED_KEYS = 20
_COMPARED_KEYS = 1000


class _Undefined(jinja2.StrictUndefined):
    """`StrictUndefined` whose error for a missing key lists the keys that exist and the closest one: a
    newcomer's `steps.fetch.result.nmae` should be fixable from the error alone."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        obj, name = self._undefined_obj, self._undefined_name
        if self._undefined_hint or not isinstance(obj, Mapping) or not isinstance(name, str):
            return str(super()._undefined_message)
        return _missing_key_message(obj, name)


def _missing_key_message(mapping: Mapping[Any, Any], name: str) -> str:
    """`no key 'nmae'; the keys are 'name', 'size'; did you mean 'name'?` (bounded for huge mappings)."""
    if not mapping:
        return f"no key {name!r}: the object is empty"
    keys = list(islice(mapping, _COMPARED_KEYS))
    listed = ", ".join(_short_repr(k) for k in keys[:_LISTED_KEYS])
    more = len(mapping) - min(len(mapping), _LISTED_KEYS)
    listed += f" and {more} more" if more else ""
    close = difflib.get_close_matches(name, [k for k in keys if isinstance(k, str)], n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"no key {name!r}; the keys are {listed}{hint}"


def _short_repr(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 60 else f"{text[:57]}..."


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with limits; `steps.x.result.items` is the result's "items" key, never `dict.items`."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self) -> None:
        super().__init__(
            undefined=_Undefined,
            autoescape=False,
            keep_trailing_newline=True,
            finalize=self._finalize,
        )
        del self.globals["lipsum"]
        self.globals["namespace"] = _Namespace
        for name in ("urlize", "striptags"):
            del self.filters[name]
        self.filters["join"] = _join
        self.filters["sum"] = _sum
        self.filters = {name: _limited_filter(name, f) for name, f in self.filters.items()}
        self.filters["_loop_guard"] = _loop_guard  # not measured: a loop may walk data larger than the cap

    def _generate(
        self, source: nodes.Template, name: str | None, filename: str | None, defer_init: bool = False
    ) -> str:
        for loop in list(source.find_all(nodes.For)):
            loop.iter = nodes.Filter(loop.iter, "_loop_guard", [], [], None, None, lineno=loop.iter.lineno)
        return super()._generate(source, name, filename, defer_init)

    @staticmethod
    def _finalize(value: Any) -> Any:
        check_deadline()
        check_size(value, "an output value")
        return value

    def concat(self, parts: Iterable[Any]) -> str:  # type: ignore[override]  # jinja's is `"".join`
        """Output gathered in a buffer (macros, `set` blocks, filter blocks) and `~`, measured as it grows."""
        return checked_join("", parts, "joined output")

    @staticmethod
    def output_buffer() -> list[Any]:
        return _Buffer()

    def getattr(self, obj: Any, attribute: str) -> Any:
        check_deadline()
        if isinstance(obj, Mapping):
            try:
                return obj[attribute]
            except (KeyError, TypeError):
                pass
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        check_deadline()
        return super().getitem(obj, argument)

    def call_binop(self, context: Context | None, operator: str, left: Any, right: Any) -> Any:
        check_deadline()
        what = f"the {operator!r} operator"
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | bytes | list | tuple) and isinstance(times, int):
                    check_length(size_of(seq) * times, f"repetition with {what}")
            _check_int(_int_bits(left) + _int_bits(right), what)
        elif operator == "**" and isinstance(right, int) and right > 0 and _int_bits(left) > 1:
            _check_int(right * _int_bits(left), what)
        elif operator == "%" and isinstance(left, str):
            check_length(_printf_size(left, right), f"formatting with {what}")
        result = self.binop_table[operator](left, right)
        if operator == "+":
            check_size(result, what)
        return result

    def checked_add(self, left: Any, right: Any) -> Any:
        return self.call_binop(None, "+", left, right)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        check_deadline()
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, str | bytes) and isinstance(obj, types.BuiltinMethodType | types.MethodType):
            what = f"{type(owner).__name__}.{obj.__name__}"
            if obj.__name__ == "join" and len(args) == 1 and not kwargs:
                items = list(_loop_guard(context, args[0]))
                check_length(size_of(items) + len(owner) * len(items), what)
                args = (items,)
            else:
                _check_str_method(owner, what, obj.__name__, args, kwargs)
        return _capped(super().call(context, obj, *args, **kwargs), f"the call of {_name(obj)}")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """`str.format` and `format_map`, with every field measured before it is built."""
        if not (
            isinstance(value, types.BuiltinMethodType | types.MethodType)
            and value.__name__ in ("format", "format_map")
            and isinstance(value.__self__, str)
        ):
            return None
        template = str(value.__self__)
        by_map = value.__name__ == "format_map"

        def format(*args: Any, **kwargs: Any) -> str:
            if by_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                kwargs, args = args[0], ()
            return _Formatter(self, f"str.{value.__name__}").vformat(template, args, kwargs)

        return format


def _name(obj: Any) -> str:
    return repr(getattr(obj, "__name__", type(obj).__name__))
