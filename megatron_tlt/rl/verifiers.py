"""Answer verifiers: extract a final answer from a response, compare it to the gold one, score countdown.

Pure functions on strings (no torch); nothing here evaluates code. Math equivalence is Hugging Face
`math-verify` (LaTeX -> sympy, the verifier open-r1 / TRL / verl use) with stricter rules on top, because
a reward that scores a wrong answer as right is what a policy learns to exploit. Countdown expressions
are parsed with `ast`, only whitelisted nodes are walked, and arithmetic is exact (`fractions.Fraction`).

    extract_answer("... so the total is \\boxed{\\frac{3}{4}}.")   # -> "\\frac{3}{4}"
    math_equal("\\dfrac34", "0.75"), math_equal("2x+2", "2(x+1)")  # -> True, True
    math_reward("6+3=9 #9", "9"), format_reward("no answer here")   # -> 1.0, 0.0
    countdown_reward("#(25+3)*7", numbers=[3, 7, 25], target=196)   # -> 1.0

Where the final answer is, in order of precedence:
1. the last `\\boxed{...}` / `\\fbox{...}` (balanced braces, nested ok); if that last box is never
   closed (a truncated response) there is no answer;
2. else the last `<answer>...</answer>` tag;
3. else the text after the last line marker, up to the end of its line or sentence: `#### X`
   (GSM8K), `#X` (our synthetic tasks: `#` glued to the answer, so Markdown headings like `## Step`
   are not markers), `The (final) answer is X`, `Answer: X`. The last marker wins, so Minerva's
   "Final Answer: The final answer is $X$. I hope it is correct." reads X.

Several answers (hedges) score 0 (`final_answers` returns them all; `math_reward` needs every one to
equal the gold): boxes joined only by "or" / "and" / commas ("either \\boxed{3} or \\boxed{4}"),
"X or Y" inside one answer, and an alternative in the same sentence right after the last box
("\\boxed{3} (or possibly 4)", "\\boxed{3}, though it could also be 4"); more than `MAX_ANSWERS`
distinct ones score 0 unchecked. A self-correction ("\\boxed{4}, no wait, \\boxed{5}") or boxes
separated by reasoning are judged on the last box.

How two answers compare (`math_equal`), after LaTeX spacing, `$`, `\\left`/`\\right` and wrappers are
removed:
- Words: units may be written or left out ("5 cm" == "5"), but when both sides name units they must be
  the same unit ("5 m" != "5 cm"; a few spellings are merged: "centimeters" == "cm"); words that change
  the quantity or hedge ("thousand", "million", "dozen", "or", "possibly", "approximately", another
  number) must appear on both sides, so "12 thousand" != "12". A wholly textual answer ("East")
  compares case-insensitively as text.
- Percent: the percent sign (or word) is dropped on both sides: "50\\%" == "50" (the number of percent,
  how MATH/GSM8K gold answers write percent questions) but "50\\%" != "0.5" (math-verify accepts that).
- Multiple choice: a gold letter A-J matches "A", "(A)", "A)", "\\text{(A)}" or "(A) <the option>".
- Numbers are exact rationals: "0.5" == "1/2" but a rounded decimal is not an exact non-terminating
  value ("0.3333333" != "1/3", "1.414" != "\\sqrt2"; math-verify rounds to 6 places and accepts them).
- Everything else is math-verify's sympy equivalence (with decimals made exact first): "2^3" == "8",
  "\\sqrt{4}" == "2", "2x+2" == "2(x+1)", "x = 5" == "5"; sets unordered ("\\{1,2,3\\}" == "\\{3,1,2\\}",
  "1, 2, 3" == "3, 2, 1"), tuples ordered ("(1,2)" != "(2,1)"), intervals with their brackets
  ("[0,1)" != "(0,1)").

Cost and timeouts: extraction is linear in the response. An answer too expensive to verify (over
`MAX_ANSWER_CHARS`, braces nested deeper than `MAX_BRACE_DEPTH`, a power tower or an exponent or
factorial that would build a huge integer) makes `math_reward` raise `VerificationTimeout` (a
TimeoutError: the reward pool scores it 0 and counts a timeout) without calling sympy. math-verify's
own timeouts are disabled: they use SIGALRM, which cannot interrupt sympy stuck in C (big-integer
arithmetic), raises in non-main threads, replaces any SIGALRM handler of the caller, stacks up to
5 s per parse and per comparison (past the pool's per-call deadline), and on expiry silently returns
"not equal" instead of a counted timeout. The per-call deadline is the reward pool's
(`megatron_tlt.rl.rewards`): a worker past it is killed, replaced, and the call counted as a timeout.
"""
from __future__ import annotations

import ast
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Optional, Sequence

import sympy
from math_verify import parse as _mv_parse
from math_verify import verify as _mv_verify

MAX_ANSWER_CHARS = 1000  # longer final answers are not verified (no real answer is that long)
MAX_BRACE_DEPTH = 40  # after redundant outer braces are peeled
MAX_ANSWERS = 8  # a response with more distinct final answers scores 0 without comparing them
MAX_EXPONENT = 100_000  # a literal exponent (or factorial) past this would build a huge integer


class VerificationTimeout(TimeoutError):
    """An answer too expensive to verify: scored 0 and counted as a timeout by the reward pool."""


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its (signal) timeouts are off; that is deliberate here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())

# --- extraction ----------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")
_MARKER_RE = re.compile(
    r"(?:####|(?<![#\w])#(?=[^\s#])|\b(?:final\s+)?answer\s*(?:is\s*:?|:))[ \t]*",
    re.IGNORECASE,
)
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")
# Between two boxes of one hedge: only punctuation, "$" and these words.
_HEDGE_GAP_RE = re.compile(
    r"(?:[\s$.,;:/()&{}\\]|\b(?:text|or|and|either|also|alternatively|possibly|perhaps|maybe|might|could|be|it|is|"
    r"are|the|answer|answers|another|one|option|options|other|equally|likely|both)\b)*",
    re.IGNORECASE,
)
_MAX_HEDGE_GAP = 80
# An alternative stated right after the last box, in the same sentence.
_TAIL_HEDGE_RE = re.compile(
    r"[$\s,;(]*(?:though\s+|but\s+)?(?:(?:it|this|the answer)\s+)?"
    r"(?:or(?:\s+(?:possibly|maybe|perhaps|equivalently))?|(?:could|might|may)\s+also\s+be|alternatively)\b:?"
    r"(?P<other>[^.\n]*?[\d\\][^\n]*?)(?=\.\s|\.$|\n|$)",
    re.IGNORECASE,
)
_ALTERNATIVES_RE = re.compile(r"\s+or\s+|\\(?:text|mbox|textrm|mathrm)\s*\{\s*or\s*\}|\bor\b(?=\s*[\\$\d(-])", re.IGNORECASE)


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


def _boxes(text: str) -> list[tuple[int, int, Optional[str]]]:
    """(start, end, content) of every top-level \\boxed / \\fbox; the last has content None if unclosed."""
    boxes, pos = [], 0
    while (box := _BOX_RE.search(text, pos)) is not None:
        start = box.end()
        if text.startswith("{", start):
            content = _braced(text, start)
            if content is None:
                boxes.append((box.start(), len(text), None))
                return boxes
            pos = start + len(content) + 2
        else:  # "\\boxed 5" (no braces)
            token = re.match(r"[^\s$]*", text[start:]).group(0)
            content, pos = token or None, start + len(token)
        boxes.append((box.start(), pos, content))
    return boxes


def _last_answer_tag(text: str) -> Optional[str]:
    """The content of the last <answer>...</answer> (found from the end: linear even on many unclosed tags)."""
    lower = text.lower()
    end = lower.rfind("</answer>")
    start = lower.rfind("<answer>", 0, end) if end >= 0 else -1
    return text[start + len("<answer>") : end] if start >= 0 else None


def _last_marker(text: str) -> Optional[str]:
    """The text after the last answer marker, to the end of its line (or the next line) or sentence."""
    last = None
    for last in _MARKER_RE.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end() :]
    line, _, after = rest.partition("\n")
    if not line.strip():  # "Final Answer:\n$7$"
        line = after.lstrip("\n").partition("\n")[0]
    return _SENTENCE_END_RE.split(line, maxsplit=1)[0]


def _clean(answer: str) -> Optional[str]:
    answer = answer.strip().strip("*").strip()  # "**Answer:** 5" leaves "** 5"
    return answer or None


def extract_answer(text: str) -> Optional[str]:
    """The final answer in `text` (see the module docstring for where it is looked for), or None."""
    boxes = _boxes(text)
    if boxes:
        content = boxes[-1][2]
        return _clean(content) if content is not None else None
    tag = _last_answer_tag(text)
    if tag is not None:
        return _clean(tag)
    marker = _last_marker(text)
    return _clean(marker) if marker is not None else None


def _split_alternatives(answer: str) -> list[str]:
    """"12 or 13" -> ["12", "13"]; an answer without "or" -> [answer]."""
    parts = [p for p in (_clean(p) for p in _ALTERNATIVES_RE.split(answer)) if p is not None]
    return parts or [answer]


def final_answers(text: str) -> list[str]:
    """Every final answer the response commits to: one, or several when it hedges; [] when none.

    The last box and the boxes before it that are joined to it only by connectives ("or", "and",
    commas: `_HEDGE_GAP_RE`) count, each split at "or"; a box after other words (a self-correction,
    more reasoning) stands alone.
    """
    boxes = _boxes(text)
    if boxes:
        if boxes[-1][2] is None:
            return []
        first = len(boxes) - 1
        while first > 0:
            gap = text[boxes[first - 1][1] : boxes[first][0]]
            if len(gap) > _MAX_HEDGE_GAP or not _HEDGE_GAP_RE.fullmatch(gap):
                break
            first -= 1
        chain = boxes[first:]
        contents = [c for c in (_clean(b[2]) for b in chain) if c is not None]
        tail = _TAIL_HEDGE_RE.match(text, boxes[-1][1], min(len(text), boxes[-1][1] + _MAX_HEDGE_GAP))
        if tail:  # "\\boxed{3} (or possibly 4)", "\\boxed{3}, though it could also be 4"
            contents.append(tail.group("other").strip(" $()."))
    else:
        answer = extract_answer(text)
        contents = [answer] if answer is not None else []
    return [part for content in contents for part in _split_alternatives(content)]


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
_TEXT_CMD = r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm)\s*"
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


def _substitute(s: str, replace: tuple[tuple[str, str], ...], delete: tuple[str, ...] = ()) -> str:
    """`s` with each (old, new) of `replace` applied in order, then every token of `delete` removed."""
    for old, new in replace:
        s = s.replace(old, new)
    for token in delete:
        s = s.replace(token, "")
    return s


def normalize_math(s: str) -> str:
    """A canonical string for a math answer: LaTeX spacing, delimiters, units and wrappers removed.

    Used for countdown results and cheap string equality; `math_equal` does the full comparison.
    """
    s = _LEFT_RIGHT_RE.sub("", _substitute(_unwrap(s), _REPLACE, _DELETE))
    s = _FRAC_RE.sub(lambda m: "\\frac" + _brace(m.group(1)) + _brace(m.group(2)), s)
    s = _SQRT_RE.sub(lambda m: "\\sqrt" + _brace(m.group(1)), s)
    s = _TRAILING_UNIT_RE.sub("", s)
    s = _TEXT_RE.sub(lambda m: m.group(1), s)
    s = _unwrap(s).rstrip(".").strip()
    s = _ASSIGNMENT_RE.sub("", s)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    return re.sub(r"\s+", "", s)


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


# --- the parts of an answer: math, units, words --------------------------------------------------

_SURFACE_DELETE = (
    "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\qquad", "\\quad", "~", "\\$", "$",
    "^{\\circ}", "^\\circ", "{}^\\circ", "\\circ", "\\degree", "°", "\\%", "%",
)
_SURFACE_REPLACE = (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\varnothing", "\\emptyset"), ("−", "-"),
                    ("{,}", ","), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""))
_TEXT_GROUP_RE = re.compile(_TEXT_CMD + r"\{([^{}]*)\}(\^\{?\d\}?)?")
# "5 cm", "12 thousand", "5 apples": words after a plain number (not "\\sin^2 x + \\cos^2 x").
_TRAILING_WORDS_RE = re.compile(r"^([-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+|\\frac\{\d+\}\{\d+\})(?:\s*/\s*\d+)?)\s+([A-Za-z][A-Za-z\s/^{}\d.]*?)\s*$")
_REPEATING_RE = re.compile(r"(\d*)\.(\d*)\\overline\{(\d+)\}")
_WORD_RE = re.compile(r"[A-Za-z]+(?:\s*\^\s*\{?\d\}?)?|\d+")  # "cm^2" is one unit
_CHOICE_RE = re.compile(r"\(?\s*([A-J])\s*\)?")
_CHOICE_PRED_RE = re.compile(r"\(\s*([A-J])\s*\)(\s.*)?", re.DOTALL)  # "(D) 12": the letter, then its option
_LEADING_RELATION_RE = re.compile(r"\s*(?:\\(?:geq?|leq?|neq?|geqslant|leqslant|gg|ll)(?![A-Za-z])|[<>≤≥≠]=?)")
_OTHER_CHOICE_RE = re.compile(r"\(\s*[A-J]\s*\)|\b[A-J]\b|\b(?:or|and)\b", re.IGNORECASE)
# Words that change the quantity or hedge: they must appear on both sides.
_QUALIFIERS = frozenset(
    "thousand thousands million millions billion billions trillion hundred hundreds dozen dozens half "
    "thousandths hundredths tenths or possibly maybe perhaps probably approximately approx about around "
    "roughly nearly almost least most more less than not no between either and plus minus negative k".split()
)
_IGNORED_WORDS = frozenset("percent percentage pct per a an of the".split())
_UNIT_SYNONYMS = {
    "centimeter": "cm", "centimetre": "cm", "meter": "m", "metre": "m", "millimeter": "mm", "millimetre": "mm",
    "kilometer": "km", "kilometre": "km", "inch": "in", "inche": "in", "foot": "ft", "feet": "ft",
    "yard": "yd", "mile": "mi", "second": "s", "sec": "s", "minute": "min", "hour": "h", "hr": "h",
    "gram": "g", "kilogram": "kg", "milligram": "mg", "liter": "l", "litre": "l", "milliliter": "ml",
    "pound": "lb", "lbs": "lb", "dollar": "usd", "degree": "deg", "square": "sq", "unit": "unit",
}


def _unit(word: str) -> str:
    word = word.lower()
    for candidate in (word, word[:-1] if word.endswith("s") else None, word[:-2] if word.endswith("es") else None):
        if candidate in _UNIT_SYNONYMS:
            return _UNIT_SYNONYMS[candidate]
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


@dataclass(frozen=True)
class _Parts:
    """An answer taken apart: kind ("math" | "text" | "choice"), what is compared, units, qualifiers."""

    kind: str
    core: str
    units: frozenset = frozenset()
    qualifiers: tuple = ()


def _words(text: str, units: set, qualifiers: list) -> None:
    for word in _WORD_RE.findall(text):
        word, _, power = re.sub(r"[\s{}]", "", word).partition("^")
        lower = word.lower()
        if word.isdigit() or lower in _QUALIFIERS:
            qualifiers.append(lower)
        elif lower not in _IGNORED_WORDS:
            units.add(_unit(word) + ("^" + power if power else ""))


def _repeating_fraction(m: re.Match) -> str:
    """0.1\\overline{6} -> \\frac{1}{6}: a repeating decimal is an exact value."""
    whole, fixed, period = m.group(1) or "0", m.group(2), m.group(3)
    value = Fraction(int(whole)) + Fraction(int(fixed or "0"), 10 ** len(fixed)) + Fraction(
        int(period), (10 ** len(period) - 1) * 10 ** len(fixed)
    )
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


@lru_cache(maxsize=4096)
def _parts(answer: str) -> _Parts:
    s = _LEFT_RIGHT_RE.sub("", _substitute(_unwrap(answer), _SURFACE_REPLACE, _SURFACE_DELETE))
    s = _unwrap(s).strip().rstrip(".").strip()
    whole_text = _TEXT_GROUP_RE.fullmatch(s)
    if whole_text:  # \text{East}, \textbf{(B)}, \text{5}
        s = whole_text.group(1).strip().rstrip(".").strip()
    choice = _CHOICE_RE.fullmatch(s)
    if choice:
        return _Parts("choice", choice.group(1))
    choice = _CHOICE_PRED_RE.fullmatch(_TEXT_GROUP_RE.sub(lambda m: m.group(1), s).strip())  # \textbf{(D) } 12
    if choice and not _OTHER_CHOICE_RE.search(choice.group(2) or ""):
        return _Parts("choice", choice.group(1))
    if re.fullmatch(r"[A-Za-z][A-Za-z\s'-]+", s) and (whole_text or " " in s.strip()):
        return _Parts("text", " ".join(s.lower().split()))
    units: set = set()
    qualifiers: list = []
    core = _TEXT_GROUP_RE.sub(lambda m: _words(m.group(1) + (m.group(2) or ""), units, qualifiers) or " ", s)
    relation = _LEADING_RELATION_RE.match(core)
    if relation:  # "\\geq 4" is not 4
        qualifiers.append(relation.group(0).strip())
        core = core[relation.end() :]
    if re.search(r"\\(?:approx|sim|simeq)(?![A-Za-z])|≈", core):  # "\approx 7" claims an approximation
        qualifiers.append("approximately")
        core = re.sub(r"^.*(?:\\(?:approx|sim|simeq)(?![A-Za-z])|≈)", "", core)
    trailing = _TRAILING_WORDS_RE.match(core.strip())
    if trailing:
        _words(trailing.group(2), units, qualifiers)
        core = trailing.group(1)
    core = _REPEATING_RE.sub(_repeating_fraction, core)
    core = core.strip().rstrip(".").strip()
    if _THOUSANDS_RE.fullmatch(core):
        core = core.replace(",", "")
    for word in ("percent", "percentage"):  # "50 percent" outside \text
        core = re.sub(r"\s*\b" + word + r"\b", "", core)
    return _Parts("math", core, frozenset(units), tuple(sorted(qualifiers)))


# --- cost guards ---------------------------------------------------------------------------------

_POWER_RE = re.compile(r"\^\s*(\{|\\?[A-Za-z]+|\d)")
_FACTORIAL_RE = re.compile(r"(\d+)\s*!")


def _exponent_bound(text: str) -> float:
    """log10 of an upper bound of a literal exponent expression ("12", "10^{10}", "{2^{2^5}}"), or 0 if symbolic."""
    text = text.strip()
    while text.startswith("{") and text.endswith("}"):
        text = text[1:-1].strip()
    if text.isdigit():
        return len(text.lstrip("0")) - 1 if text.strip("0") else 0.0
    base, caret, exponent = text.partition("^")
    if caret and base.strip().isdigit():
        log_base = math.log10(max(int(base.strip()[:50]), 2)) if len(base.strip()) < 50 else 50.0
        return min(log_base * 10 ** min(_exponent_bound(exponent), 300.0), 1e300)
    return 0.0


def _check_cost(core: str) -> None:
    """Raise VerificationTimeout if verifying `core` with sympy could take unbounded time or memory."""
    if len(core) > MAX_ANSWER_CHARS:
        raise VerificationTimeout(f"answer of {len(core)} characters (> {MAX_ANSWER_CHARS})")
    depth = deepest = 0
    for ch in core:
        depth += (ch == "{") - (ch == "}")
        deepest = max(deepest, depth)
    if deepest > MAX_BRACE_DEPTH:
        raise VerificationTimeout(f"braces nested {deepest} deep (> {MAX_BRACE_DEPTH})")
    for power in _POWER_RE.finditer(core):
        start = power.start(1)
        exponent = _braced(core, start) if core[start] == "{" else power.group(1)
        if exponent is not None and _exponent_bound(exponent) > math.log10(MAX_EXPONENT):
            raise VerificationTimeout(f"exponent {exponent[:40]!r} too large to evaluate")
    for factorial in _FACTORIAL_RE.finditer(core):
        if len(factorial.group(1)) > 6 or int(factorial.group(1)) > MAX_EXPONENT:
            raise VerificationTimeout(f"factorial of {factorial.group(1)[:40]} too large to evaluate")


# --- comparison ----------------------------------------------------------------------------------


def _exact(expr):
    """expr with every decimal literal replaced by its exact rational value (0.3333333 -> 3333333/10^7)."""
    if isinstance(expr, sympy.MatrixBase):
        return expr.applyfunc(_exact)
    if isinstance(expr, sympy.Basic):
        floats = expr.atoms(sympy.Float)
        if floats:
            return expr.xreplace({f: sympy.Rational(str(f)) for f in floats})
    return expr


@lru_cache(maxsize=4096)
def _sympy(core: str) -> tuple:
    """math-verify's parse of one answer (no signal timeout: see the module docstring), decimals made exact."""
    parsed = _mv_parse("\\boxed{" + core + "}", parsing_timeout=None)
    return tuple(_exact(p) for p in parsed)


_VARIABLE_RE = re.compile(r"\s*(?:(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?(?:\([A-Za-z, ]*\))?)?\s*")  # x, y_1, f(x), ""


def _has_decimal(core: str) -> bool:
    return re.search(r"\d\.\d|(?<!\d)\.\d", core) is not None


def _exactly_equal(gold, pred) -> bool:
    """For decimals made exact: sympy's symbolic zero test, never a numeric tolerance."""
    if not (isinstance(gold, sympy.Expr) and isinstance(pred, sympy.Expr)):
        return True  # sets, tuples, relations: math-verify compared their elements exactly already
    try:
        return gold == pred or sympy.simplify(gold - pred).is_zero is True
    except Exception:
        return False


def _shape(core: str) -> str:
    """"set" for \\{...\\}, "bracketed" for a bracket pair around a comma list ("(1,2)", "[0,1)"), else ""."""
    core = core.strip()
    if core.startswith("\\{") and core.endswith("\\}"):
        return "set"
    if core[:1] in "([" and core[-1:] in ")]" and "," in core:
        return "bracketed"
    return ""


def _math_equal(pred: str, gold: str) -> bool:
    """Whether the two cores (no units or words left) are the same mathematical object."""
    if not pred or not gold:
        return False
    if pred == gold:
        return True
    if {_shape(pred), _shape(gold)} == {"set", "bracketed"}:  # a set is not a tuple or an interval
        return False
    pred_fast = as_fraction(normalize_math(pred)) if "=" not in pred else None
    gold_fast = as_fraction(normalize_math(gold)) if "=" not in gold else None
    if pred_fast is not None and gold_fast is not None:
        return pred_fast == gold_fast
    _check_cost(pred)
    _check_cost(gold)
    if ("=" in pred) != ("=" in gold):  # "x = 5" == "5", "2+3=5" == "5", but "5 = 6" != "6"
        equation, value = (pred, gold) if "=" in pred else (gold, pred)
        sides = [side for side in equation.split("=") if not _VARIABLE_RE.fullmatch(side)]
        return bool(sides) and all(_math_equal(side, value) for side in sides)
    gold_parsed, pred_parsed = list(_sympy(gold)), list(_sympy(pred))
    if not gold_parsed or not pred_parsed:
        return normalize_math(pred) == normalize_math(gold)
    if not _mv_verify(gold_parsed, pred_parsed, timeout_seconds=None):
        return False
    if _has_decimal(pred) or _has_decimal(gold):
        return _exactly_equal(gold_parsed[0], pred_parsed[0])
    return True


def _text(parts: _Parts) -> str:
    return " ".join(parts.core.lower().split())


def _equal_parts(pred: _Parts, gold: _Parts) -> bool:
    if pred.qualifiers != gold.qualifiers:
        return False
    if pred.units and gold.units and pred.units != gold.units:
        return False
    if "choice" in (pred.kind, gold.kind):
        return pred.kind == gold.kind and pred.core == gold.core
    if "text" in (pred.kind, gold.kind):
        return _text(pred) == _text(gold)
    return _math_equal(pred.core, gold.core)


def _math_equal_or_raise(pred: Optional[str], gold: Optional[str]) -> bool:
    if pred is None or gold is None:
        return False
    pred, gold = _unwrap(pred), _unwrap(gold)  # linear: redundant braces around a short answer are fine
    for answer in (pred, gold):
        if len(answer) > 4 * MAX_ANSWER_CHARS:  # before any normalisation work (the core is checked again)
            raise VerificationTimeout(f"answer of {len(answer)} characters (> {MAX_ANSWER_CHARS})")
    return _equal_parts(_parts(pred), _parts(gold))


def math_equal(pred: Optional[str], gold: Optional[str]) -> bool:
    """Whether two answers are the same mathematical object (see the module docstring).

    An answer too expensive to verify is not equal here; `math_reward` raises VerificationTimeout instead.
    """
    try:
        return _math_equal_or_raise(pred, gold)
    except VerificationTimeout:
        return False


# --- rewards -------------------------------------------------------------------------------------


def math_reward(response: str, gold: str) -> float:
    """1.0 if the response commits to one final answer (hedges: every one) and it equals `gold`, else 0.0.

    Raises VerificationTimeout for an answer too expensive to verify (the reward pool counts a timeout).
    """
    answers = list(dict.fromkeys(final_answers(response)))  # the same answer twice is one answer
    if not answers or len(answers) > MAX_ANSWERS:  # spraying answers is a hedge; bounds the work too
        return 0.0
    if all(_math_equal_or_raise(answer, gold) for answer in answers):
        return 1.0
    if len(answers) > 1 and _math_equal_or_raise(", ".join(answers), gold):  # gold "3, 4": "\\boxed{3} and \\boxed{4}"
        return 1.0
    return 0.0


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
    expression = _substitute(expression, _COUNTDOWN_REPLACE)
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
