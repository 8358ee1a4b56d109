"""A small, safe evaluator for the ``condition`` strings of scaling-layer configs.

Grammar (anything else raises ``ValueError``): names (only ``module``), attribute access,
``.shape``, subscripts with integer constants, comparisons (``== != < > <= >=``), ``and`` /
``or`` / ``not``, integer constants, parentheses and ``hasattr(<expression>, '<name>')``. Examples:
``module.self_attn.v_proj.weight.shape == module.self_attn.o_proj.weight.shape``;
``hasattr(module, 'mlp') and hasattr(module.mlp, 'gate_proj')`` (a group found in some layers only).
Strings are parsed with :mod:`ast`; nothing is ever passed to ``eval``. Every failure, whatever the
string (from a JSON file), is a ``ValueError`` naming the condition.
"""

from __future__ import annotations

import ast
import operator
import warnings
from typing import Any

MAX_CONDITION_CHARS = 1000
# What evaluating a well-formed condition can still raise on a given module: an index out of range,
# a value that is not subscriptable or comparable, an integer too large for an index, nesting too deep.
_EVALUATION_ERRORS = (IndexError, KeyError, TypeError, RuntimeError, OverflowError, RecursionError, AttributeError)

_COMPARE = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
    ast.Gt: operator.gt, ast.LtE: operator.le, ast.GtE: operator.ge,
}


def _fail(node: ast.AST, text: str) -> ValueError:
    return ValueError(
        f"condition {text!r}: {type(node).__name__} is not allowed; allowed: the name 'module', "
        "attribute access, .shape, integer subscripts, comparisons, and/or/not, integer constants"
    )


def _eval(node: ast.AST, module: Any, text: str) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body, module, text)
    if isinstance(node, ast.Name):
        if node.id != "module":
            raise ValueError(f"condition {text!r}: unknown name {node.id!r}; only 'module' is allowed")
        return module
    if isinstance(node, ast.Attribute):
        if node.attr.startswith("_"):
            raise ValueError(f"condition {text!r}: private attribute {node.attr!r} is not allowed")
        base = _eval(node.value, module, text)
        try:
            return getattr(base, node.attr)
        except AttributeError:
            raise ValueError(f"condition {text!r}: {type(base).__name__} has no attribute {node.attr!r}") from None
    if isinstance(node, ast.Subscript):
        index = node.slice
        sign = 1
        if isinstance(index, ast.UnaryOp) and isinstance(index.op, ast.USub):
            sign, index = -1, index.operand
        if not (isinstance(index, ast.Constant) and type(index.value) is int):
            raise _fail(index, text)
        return _eval(node.value, module, text)[sign * index.value]
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:
            raise _fail(node, text)
        return node.value
    if isinstance(node, ast.Compare):
        left = _eval(node.left, module, text)
        for op, right_node in zip(node.ops, node.comparators):
            if type(op) not in _COMPARE:
                raise _fail(op, text)
            right = _eval(right_node, module, text)
            result = _COMPARE[type(op)](left, right)
            if not isinstance(result, bool):
                raise ValueError(f"condition {text!r}: compares {type(left).__name__} with {type(right).__name__}, "
                                 "which gives no truth value; compare integers or shapes")
            if not result:
                return False
            left = right
        return True
    if isinstance(node, ast.BoolOp):
        values = (_eval(v, module, text) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _eval(node.operand, module, text)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
            and len(node.args) == 2 and not node.keywords):
        name = node.args[1]
        if not (isinstance(name, ast.Constant) and isinstance(name.value, str) and name.value.isidentifier()
                and not name.value.startswith("_")):
            raise ValueError(f"condition {text!r}: hasattr takes an expression and a public attribute name "
                             "in quotes, e.g. hasattr(module.mlp, 'gate_proj')")
        return hasattr(_eval(node.args[0], module, text), name.value)
    raise _fail(node, text)


def evaluate_condition(text: str | None, module: Any) -> bool:
    """Evaluate ``text`` with ``module`` bound to the decoder layer; empty means true."""
    if text is None:
        return True
    if not isinstance(text, str):
        raise ValueError(f"condition must be a string, got {type(text).__name__}")
    if not text.strip():
        return True
    if len(text) > MAX_CONDITION_CHARS:
        raise ValueError(f"condition {text[:60]!r}... is {len(text)} characters long; at most "
                         f"{MAX_CONDITION_CHARS} are allowed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # e.g. "invalid decimal literal": refused below anyway
            tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"condition {text!r} is not a valid expression: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, nesting too deep for the parser
        raise ValueError(f"condition {text!r} is not a valid expression ({type(exc).__name__})") from None
    try:
        result = _eval(tree, module, text)
    except _EVALUATION_ERRORS as exc:
        raise ValueError(f"condition {text!r} cannot be evaluated on {type(module).__name__}: "
                         f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(result, (bool, int)):
        raise ValueError(f"condition {text!r} gives a {type(result).__name__}, not a truth value; "
                         "write a comparison")
    return bool(result)
