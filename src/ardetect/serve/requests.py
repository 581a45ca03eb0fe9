"""Checks of an attribution request's fields; each failure names the field and the problem.

Used by the HTTP app and by ``ard attribute`` alike, so both refuse the same input with
the same words.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

# bidirectional classes of right-to-left letters and of the embedding / override / isolate controls
RTL_BIDI = {"R", "AL", "RLE", "RLO", "RLI", "LRE", "LRO", "LRI", "FSI", "PDF", "PDI"}
IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")


class RequestError(ValueError):
    """A request field that cannot be used: ``field`` names it, ``problem`` says why, ``status`` is the HTTP status."""

    def __init__(self, field: str, problem: str, status: int = 422):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem, self.status = field, problem, status


@dataclass(frozen=True)
class Limits:
    max_top_k: int = 100
    max_candidates: int = 1000
    max_prompt_chars: int = 500
    max_pixels: int = 16_777_216
    max_shortlist: int = 1000

    @classmethod
    def of(cls, serve_cfg) -> "Limits":
        return cls(serve_cfg.max_top_k, serve_cfg.max_candidates, serve_cfg.max_prompt_chars, serve_cfg.max_pixels,
                   serve_cfg.max_shortlist)


def check_text(field: str, text: str | None, max_chars: int) -> str:
    """A prompt or phrase: not empty, not too long, no control or format characters, no right-to-left text."""
    if text is None or not text.strip():
        raise RequestError(field, "is empty")
    if len(text) > max_chars:
        raise RequestError(field, f"is {len(text)} characters, more than the limit of {max_chars} (serve.max_prompt_chars)")
    for i, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Cs", "Co", "Cn"):
            name = unicodedata.name(ch, f"U+{ord(ch):04X}")
            raise RequestError(field, f"holds a control or format character at position {i} (U+{ord(ch):04X} {name})")
        if unicodedata.bidirectional(ch) in RTL_BIDI:
            name = unicodedata.name(ch, f"U+{ord(ch):04X}")
            raise RequestError(field, f"holds right-to-left text at position {i} (U+{ord(ch):04X} {name}); prompts are read left to right")
    return text


def check_prompt(prompt: str | None, phrase: str | None, max_chars: int) -> tuple[str, str]:
    """(prompt, phrase) checked; the phrase must occur in the prompt, as the tokenizer will look for it."""
    prompt = check_text("prompt", prompt, max_chars)
    phrase = check_text("phrase", phrase, max_chars)
    if phrase.strip().lower() not in prompt.lower():
        raise RequestError("phrase", f"{phrase!r} does not occur in the prompt {prompt!r}")
    return prompt, phrase


def parse_box(text) -> list[float]:
    """'x0,y0,x1,y1' (pixels; commas or spaces) or four numbers -> [x0, y0, x1, y1], finite, with area."""
    if isinstance(text, str):
        parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    else:
        parts = list(text)
    if len(parts) != 4:
        raise RequestError("box", f"needs four numbers x0,y0,x1,y1 in pixels, got {len(parts)}: {text!r}")
    try:
        box = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise RequestError("box", f"needs four numbers x0,y0,x1,y1 in pixels, got {text!r}") from None
    if not all(math.isfinite(v) for v in box):
        raise RequestError("box", f"holds a value that is not finite: {box}")
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise RequestError("box", f"{box} has no area: need x1 > x0 and y1 > y0")
    return box


def check_box_in_image(box: list[float], width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise RequestError("box", f"{box} lies outside the {width}x{height} (w x h) image")
    return box


def check_top_k(top_k: int, limits: Limits) -> int:
    if not 1 <= int(top_k) <= limits.max_top_k:
        raise RequestError("top_k", f"{top_k} is outside 1..{limits.max_top_k} (serve.max_top_k)")
    return int(top_k)


def check_shortlist(shortlist: int | None, limits: Limits) -> int | None:
    if shortlist is not None and not 1 <= int(shortlist) <= limits.max_shortlist:
        raise RequestError("shortlist", f"{shortlist} is outside 1..{limits.max_shortlist} (serve.max_shortlist)")
    return shortlist


def parse_candidates(values: list[str] | str | None, limits: Limits) -> list[str] | None:
    """Candidate ids from repeated fields and/or comma-separated lists; None when none were given."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    ids = [p.strip() for v in values for p in str(v).split(",") if p.strip()]
    if not ids:
        return None
    if len(ids) > limits.max_candidates:
        raise RequestError("candidates", f"{len(ids)} ids, more than the limit of {limits.max_candidates} (serve.max_candidates)")
    bad = [i for i in ids if not IMAGE_ID.match(i)]
    if bad:
        raise RequestError("candidates", f"malformed ids {bad[:5]!r}: ids are letters, digits, '.', '_', '-' and '/'")
    return list(dict.fromkeys(ids))
