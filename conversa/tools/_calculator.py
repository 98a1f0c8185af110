"""Safe arithmetic: an `ast` walker over numbers, operators and a few math functions, no eval."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from ..errors import ToolError

MAX_EXPRESSION_CHARS = 1_000
MAX_NODES = 200
# Integers beyond this many bits (about 3000 decimal digits) are refused before they are
# computed, so `9**9**9` and friends cannot hang the process or eat its memory.
MAX_INT_BITS = 10_000
MAX_ROUND_DIGITS = 300

Number = int | float

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "log": math.log,
    "exp": math.exp,
    "abs": abs,
    "round": round,
}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}
_HINTS: dict[type[ast.AST], str] = {
    ast.BitXor: "'^' is not a power here; use '**', e.g. 2**10",
    ast.Attribute: "attribute access is not allowed",
    ast.Subscript: "indexing is not allowed",
    ast.Compare: "comparisons are not supported",
    ast.Lambda: "lambdas are not allowed",
}


def calculate(expression: str) -> Number:
    """Evaluate an arithmetic expression safely; a ToolError says what is not allowed."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(
            f"the expression is {len(expression)} characters long; the limit is "
            f"{MAX_EXPRESSION_CHARS}, split the calculation into smaller steps"
        )
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"{_shown(expression)!r} is not a valid expression: {exc.msg}") from exc
    except (RecursionError, MemoryError) as exc:
        raise ToolError("the expression is nested too deeply; simplify it") from exc
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ToolError(
            f"the expression has more than {MAX_NODES} parts; split it into smaller steps"
        )
    try:
        return _evaluate(tree.body)
    except ZeroDivisionError as exc:
        raise ToolError("division by zero") from exc
    except OverflowError as exc:
        raise ToolError("the result is too large to represent") from exc
    except (ValueError, TypeError) as exc:
        raise ToolError(f"cannot calculate {_shown(expression)!r}: {exc}") from exc


def _shown(expression: str) -> str:
    return expression if len(expression) <= 60 else expression[:57] + "..."


def _evaluate(node: ast.expr) -> Number:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ToolError(f"only numbers are allowed, not {node.value!r}")
        return node.value
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise ToolError(f"unknown name {node.id!r}; known constants: {', '.join(_CONSTANTS)}")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check_size(_UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        _refuse_huge(node.op, left, right)
        return _check_size(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Call):
        return _call(node)
    op = getattr(node, "op", None)
    hint = _HINTS.get(type(node)) or (_HINTS.get(type(op)) if isinstance(op, ast.AST) else None)
    raise ToolError(
        hint
        or f"{type(node).__name__} is not allowed; use numbers, + - * / // % **, "
        f"parentheses and {', '.join(_FUNCTIONS)}"
    )


def _call(node: ast.Call) -> Number:
    if isinstance(node.func, ast.Attribute):
        raise ToolError(_HINTS[ast.Attribute])
    if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
        raise ToolError(f"only these functions can be called: {', '.join(_FUNCTIONS)}")
    if node.keywords:
        raise ToolError(f"{node.func.id}() takes positional arguments only")
    arguments = [_evaluate(argument) for argument in node.args]
    if node.func.id == "round" and len(arguments) == 2:
        _check_round_digits(arguments[1])
    return _check_size(_FUNCTIONS[node.func.id](*arguments))


def _check_round_digits(digits: Number) -> None:
    # round(5, -10**9) would compute 10**(10**9) internally.
    if not isinstance(digits, int) or abs(digits) > MAX_ROUND_DIGITS:
        raise ToolError(
            f"round(x, n) needs a whole number n between {-MAX_ROUND_DIGITS} and "
            f"{MAX_ROUND_DIGITS}, got {digits!r}"
        )


def _refuse_huge(op: ast.operator, left: Number, right: Number) -> None:
    """Refuse integer results over MAX_INT_BITS before computing them."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return  # float arithmetic is bounded; overflow raises OverflowError
    if isinstance(op, ast.Pow) and right > 0 and abs(left) > 1:
        bits = right * math.log2(abs(left))
    elif isinstance(op, ast.Mult):
        bits = left.bit_length() + right.bit_length()
    else:
        return
    if bits > MAX_INT_BITS:
        raise ToolError(
            f"the result would have about {int(bits * math.log10(2)) + 1} digits; the limit is "
            f"about {int(MAX_INT_BITS * math.log10(2))}, so this is refused"
        )


def _check_size(value: Any) -> Number:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError("the result is too large; the calculator refuses integers this big")
    if not isinstance(value, int | float):
        # Only complex results (e.g. a negative number to a fractional power) get here.
        raise ToolError(f"the result {value!r} is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("the result is too large to represent (or not a number)")
    return value


def format_number(value: Number) -> str:
    """A result as text: integers exactly, floats in their shortest exact form."""
    return str(value) if isinstance(value, int) else repr(value)
