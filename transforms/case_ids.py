"""Case selection: the `--cases` language and where a case's file lives."""
from __future__ import annotations

import re

_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
_SINGLE = re.compile(r"^\d+$")


class CaseSpecError(ValueError):
    """A `--cases` string that cannot be parsed; names every bad part."""


def parse_cases(text: str) -> list[int]:
    """Parse "1-10,17,0022" into case ids: duplicates removed, order kept.

    Zero padding is allowed ("0022" is case 22). Empty parts, reversed ranges,
    letters, negative numbers and 0 are refused, all bad parts named at once.
    """
    if text is None or not text.strip():
        raise CaseSpecError("empty: give ids and ranges like '1-10,17,0022'")
    ids: list[int] = []
    bad: list[str] = []
    for raw in text.split(","):
        part = raw.strip()
        m = _RANGE.match(part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                bad.append(f"'{part}' (range runs backwards)")
            elif lo < 1:
                bad.append(f"'{part}' (case ids start at 1)")
            else:
                ids.extend(range(lo, hi + 1))
        elif _SINGLE.match(part):
            if int(part) < 1:
                bad.append(f"'{part}' (case ids start at 1)")
            else:
                ids.append(int(part))
        elif not part:
            bad.append("'' (empty part)")
        else:
            bad.append(f"'{part}' (not an id or a range a-b)")
    if bad:
        raise CaseSpecError("bad part(s) " + ", ".join(bad))
    return list(dict.fromkeys(ids))


def format_cases(ids: list[int]) -> str:
    """The --cases text of a list of ids, runs written as ranges, order kept:
    [1, 2, 3, 5, 9, 8] -> "1-3,5,9,8"; parse_cases reads it back."""
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if j == i else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def case_file_candidates(input_dir: str, case_id: int) -> list[str]:
    """Where a case's file may be, in the order tried: <id:04d>.vital, <id>.vital."""
    base = input_dir.rstrip("/")
    names = dict.fromkeys([f"{case_id:04d}.vital", f"{case_id}.vital"])
    return [f"{base}/{n}" for n in names]


_VITAL_NAME = re.compile(r"(?:^|/)(\d+)\.vital$")


def case_id_from_path(path: str) -> int | None:
    m = _VITAL_NAME.search(path)
    return int(m.group(1)) if m and int(m.group(1)) >= 1 else None
