"""Answer verifiers: extract a final answer from a response, compare it to the gold one, score countdown.

Pure functions on strings (no torch), cheap enough to run thousands of times per RL step, and safe:
nothing here evaluates code. Countdown expressions are parsed with `ast`, only whitelisted nodes are
walked, and arithmetic is exact (`fractions.Fraction`).

    extract_answer("... so the total is \\boxed{\\frac{3}{4}}.")   # -> "\\frac{3}{4}"
    math_equal("\\dfrac34", "0.75")                                 # -> True
    math_reward("6+3=9 #9", "9"), format_reward("no answer here")   # -> 1.0, 0.0
    countdown_reward("#(25+3)*7", numbers=[3, 7, 25], target=196)   # -> 1.0

Where the final answer is, in order of precedence:
1. the last `\\boxed{...}` / `\\fbox{...}` (balanced braces, nested ok); if that last box is never
   closed (a truncated response) there is no answer;
2. else the last `<answer>...</answer>` tag;
3. else the text after the last line marker, up to the end of its line or sentence: `#### X`
   (GSM8K), `#X` (our synthetic tasks: `#` glued to the answer, so Markdown headings like `## Step`
   are not markers), `The (final) answer is X`, `Answer: X`.

How two answers compare (`math_equal`): both are normalised (`normalize_math`); if both then read as
numbers (integers, decimals, `a/b`, `\\frac{a}{b}`, signs) they are compared exactly as rationals, so
"0.5" == "1/2" but "0.333" != "1/3"; tuples and intervals compare element-wise with equal brackets;
anything else must be equal as normalised strings.

Percentages: the percent sign is dropped, so "50\\%" == "50" but "50\\%" != "0.5". Gold answers in
MATH/GSM8K write "percent" questions as the number of percent, with or without the sign; a model
that answers a fraction instead has the unit wrong.
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction
from typing import Optional, Sequence

# --- extraction ----------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")
_MARKER_RE = re.compile(
    r"(?:####|(?<![#\w])#(?=[^\s#])|\b(?:final\s+)?answer\s*(?:is\s*:?|:))[ \t]*(?P<answer>[^\n]*)",
    re.IGNORECASE,
)
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")


def _braced(text: str, start: int) -> Optional[str]:
    """The content of the brace group opening at text[start] == '{', or None if it never closes."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def _last_box(text: str) -> tuple[bool, Optional[str]]:
    """(found, content) for the last top-level \\boxed / \\fbox; content is None when it is unclosed."""
    found, content, pos = False, None, 0
    while (box := _BOX_RE.search(text, pos)) is not None:
        found = True
        start = box.end()
        if text.startswith("{", start):
            content = _braced(text, start)
            if content is None:
                return True, None
            pos = start + len(content) + 2
        else:  # "\\boxed 5" (no braces)
            token = re.match(r"[^\s$]*", text[start:]).group(0)
            content, pos = token or None, start + len(token)
    return found, content


def _last_answer_tag(text: str) -> Optional[str]:
    """The content of the last <answer>...</answer> (found from the end: linear even on many unclosed tags)."""
    lower = text.lower()
    end = lower.rfind("</answer>")
    start = lower.rfind("<answer>", 0, end) if end >= 0 else -1
    return text[start + len("<answer>") : end] if start >= 0 else None


def _clean(answer: str) -> Optional[str]:
    answer = answer.strip().strip("*").strip()  # "**Answer:** 5" leaves "** 5"
    return answer or None


def extract_answer(text: str) -> Optional[str]:
    """The final answer in `text` (see the module docstring for where it is looked for), or None."""
    found, boxed = _last_box(text)
    if found:
        return _clean(boxed) if boxed is not None else None
    tag = _last_answer_tag(text)
    if tag is not None:
        return _clean(tag)
    markers = list(_MARKER_RE.finditer(text))
    if markers:
        answer = markers[-1].group("answer")
        return _clean(_SENTENCE_END_RE.split(answer, maxsplit=1)[0])
    return None


# --- normalisation -------------------------------------------------------------------------------

_DELETE = (
    "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\qquad", "\\quad", "~",
    "^{\\circ}", "^\\circ", "\\circ", "\\degree", "°", "\\%", "%", "\\$", "$", "\\(", "\\)", "\\[", "\\]",
)
_REPLACE = (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cdot", "*"), ("\\times", "*"), ("×", "*"),
            ("\\div", "/"), ("÷", "/"), ("−", "-"), ("{,}", ","))
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_ARG = r"(\{[^{}]*\}|[A-Za-z0-9])"  # a braced group or one character: \frac12, \frac{1}2, \sqrt3
_FRAC_RE = re.compile(r"\\frac\s*" + _ARG + r"\s*" + _ARG)
_SQRT_RE = re.compile(r"\\sqrt\s*" + _ARG)
_TEXT_CMD = r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf)\s*"
_TRAILING_UNIT_RE = re.compile(r"(?<=\S)\s*" + _TEXT_CMD + r"\{[^{}]*\}(?:\^\{?\d+\}?)?\s*$")
_TEXT_RE = re.compile(_TEXT_CMD + r"\{([^{}]*)\}")
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_ASSIGNMENT_RE = re.compile(r"^[A-Za-z]\s*=\s*(?=\S)")  # "x = 5"


def _brace(arg: str) -> str:
    return arg if arg.startswith("{") else "{" + arg + "}"


def _matching_braces(s: str) -> dict[int, int]:
    """{index of "{": index of its "}"} for every closed brace group, in one pass."""
    stack, matches = [], {}
    for i, ch in enumerate(s):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            matches[stack.pop()] = i
    return matches


def _unwrap(s: str) -> str:
    """Remove wrappers around the whole string: \\boxed{...}, \\fbox{...} and redundant outer braces."""
    closing = _matching_braces(s)
    lo, hi = 0, len(s)
    while True:
        while lo < hi and s[lo].isspace():
            lo += 1
        while hi > lo and s[hi - 1].isspace():
            hi -= 1
        box = _BOX_RE.match(s, lo, hi)
        start = box.end() if box else lo
        if not (s.startswith("{", start, hi) and closing.get(start) == hi - 1):
            return s[lo:hi]
        lo, hi = start + 1, hi - 1


def normalize_math(s: str) -> str:
    """A canonical string for a math answer: LaTeX spacing, delimiters, units and wrappers removed."""
    s = _unwrap(s)
    for old, new in _REPLACE:
        s = s.replace(old, new)
    for token in _DELETE:
        s = s.replace(token, "")
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _FRAC_RE.sub(lambda m: "\\frac" + _brace(m.group(1)) + _brace(m.group(2)), s)
    s = _SQRT_RE.sub(lambda m: "\\sqrt" + _brace(m.group(1)), s)
    s = _TRAILING_UNIT_RE.sub("", s)
    s = _TEXT_RE.sub(lambda m: m.group(1), s)
    s = _unwrap(s).rstrip(".").strip()
    s = _ASSIGNMENT_RE.sub("", s)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    return re.sub(r"\s+", "", s)


# --- comparison ----------------------------------------------------------------------------------

_NUMBER_RE = re.compile(_NUMBER)
_SLASH_RE = re.compile(r"(" + _NUMBER + r")/(" + _NUMBER + r")")
_LATEX_FRAC_RE = re.compile(r"([+-]?)\\frac\{(" + _NUMBER + r")\}\{(" + _NUMBER + r")\}")


def _ratio(num: str, den: str) -> Optional[Fraction]:
    den_value = Fraction(den)
    return Fraction(num) / den_value if den_value != 0 else None


def as_fraction(s: str) -> Optional[Fraction]:
    """The exact value of a normalised number ("-3", "0.50", ".5", "1/2", "-\\frac{1}{2}"), else None."""
    try:
        return _parse_fraction(s)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        return None


def _parse_fraction(s: str) -> Optional[Fraction]:
    if _NUMBER_RE.fullmatch(s):
        return Fraction(s)
    slash = _SLASH_RE.fullmatch(s)
    if slash:
        return _ratio(slash.group(1), slash.group(2))
    frac = _LATEX_FRAC_RE.fullmatch(s)
    if frac:
        value = _ratio(frac.group(2), frac.group(3))
        return -value if value is not None and frac.group(1) == "-" else value
    return None


def _split_top_level(s: str) -> list[str]:
    """Split at commas that are not inside (), [] or {}."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


def _wrapped(s: str) -> bool:
    """Whether s is one bracket group: "(1,2)" or "[0,1)" yes, "(1)+(2)" no."""
    depth = 0
    for i, ch in enumerate(s):
        depth += (ch in "([{") - (ch in ")]}")
        if depth == 0:
            return i == len(s) - 1
    return False


def _as_sequence(s: str) -> Optional[tuple[str, list[str], str]]:
    """(open bracket, items, close bracket) for "(1,2)", "[0,1)", "1,2"; None for a single item."""
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _wrapped(s):
        opening, inner, closing = s[0], s[1:-1], s[-1]
    else:
        opening, inner, closing = "", s, ""
    items = _split_top_level(inner)
    return (opening, items, closing) if len(items) >= 2 else None


def _equal_normalized(pred: str, gold: str) -> bool:
    if not pred or not gold:
        return False
    if pred == gold:
        return True
    pred_value, gold_value = as_fraction(pred), as_fraction(gold)
    if pred_value is not None and gold_value is not None:
        return pred_value == gold_value
    pred_seq, gold_seq = _as_sequence(pred), _as_sequence(gold)
    if pred_seq and gold_seq:
        (p_open, p_items, p_close), (g_open, g_items, g_close) = pred_seq, gold_seq
        return (p_open, p_close, len(p_items)) == (g_open, g_close, len(g_items)) and all(
            _equal_normalized(p, g) for p, g in zip(p_items, g_items)
        )
    return False


def math_equal(pred: Optional[str], gold: Optional[str]) -> bool:
    """Whether two answers are the same mathematical object (see the module docstring)."""
    if pred is None or gold is None:
        return False
    return _equal_normalized(normalize_math(pred), normalize_math(gold))


# --- rewards -------------------------------------------------------------------------------------


def math_reward(response: str, gold: str) -> float:
    """1.0 if the response's final answer equals `gold`, else 0.0."""
    return 1.0 if math_equal(extract_answer(response), gold) else 0.0


def format_reward(response: str) -> float:
    """1.0 if the response states a final answer in a recognised format (boxed, tag or marker)."""
    return 1.0 if extract_answer(response) is not None else 0.0


_COUNTDOWN_CHARS_RE = re.compile(r"[\d+\-*/()\s]+")
_COUNTDOWN_MAX_CHARS = 256  # bounds parser work (deep nesting) on adversarial responses
_COUNTDOWN_OPS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__, ast.Div: Fraction.__truediv__}
_COUNTDOWN_REPLACE = (("\\times", "*"), ("\\cdot", "*"), ("×", "*"), ("\\div", "/"), ("÷", "/"), ("−", "-"),
                      ("\\left", ""), ("\\right", ""), ("$", ""), ("[", "("), ("]", ")"), ("{", "("), ("}", ")"))


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """Exact value of a whitelisted expression node; appends the integer literals it uses to `used`."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _COUNTDOWN_OPS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        return _COUNTDOWN_OPS[type(node.op)](left, right)  # ZeroDivisionError on "/0"
    raise ValueError(f"disallowed syntax: {type(node).__name__}")


def countdown_value(expression: str) -> Optional[tuple[Fraction, list[int]]]:
    """(exact value, numbers used) of a countdown expression, or None if it is not one.

    Allowed: non-negative integer literals, binary + - * /, parentheses. Not allowed: unary minus,
    powers, floor division, names, calls, floats. Division is exact, so intermediate results may be
    fractions ("(7/2)*4" is 14); dividing by zero makes the expression invalid.
    """
    for old, new in _COUNTDOWN_REPLACE:
        expression = expression.replace(old, new)
    if len(expression) > _COUNTDOWN_MAX_CHARS or not _COUNTDOWN_CHARS_RE.fullmatch(expression):
        return None
    used: list[int] = []
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval").body, used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None
    return value, used


def countdown_reward(response: str, numbers: Sequence[int], target: int) -> float:
    """1.0 if the final expression uses each given number at most once and equals `target`.

    The final answer (boxed, tag or marker, as in `extract_answer`) is the expression, optionally
    followed by "= target" ("(25+3)*7 = 196"); every right-hand side must equal `target` too.
    A number given twice may be used twice. Numbers need not all be used.
    """
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    expression, *results = answer.split("=")
    if any(as_fraction(normalize_math(r)) != target for r in results):
        return 0.0
    parsed = countdown_value(expression)
    if parsed is None:
        return 0.0
    value, used = parsed
    if Counter(used) - Counter(int(n) for n in numbers):  # a number not given, or used too often
        return 0.0
    return 1.0 if value == target else 0.0
