"""How close a re-run must come to a stored history, on another machine too.

Same seed and thread count give bit-identical runs on one machine; another CPU model's matmul kernels move the last
bits (seen: a loss 3.98597e-4 against 3.98623e-4, a reward std in the 7th digit, on an AMD EPYC against the machine
that stored the runs). Each logged number must then agree within 1e-4 relative or 1e-6 absolute, whichever is larger
(the loss is a near-cancelling sum of about 1e-4, so for it the absolute bound is the one that acts), except
``clip_frac``, which counts (trajectory, step) terms whose ratio left the clip range and may flip by one term when
the last bits of a log-prob move (absolute 0.005, about 2 of 480 terms). A few updates amplify such differences
little; a wrong formula moves these numbers by percents. Integers (NFE, sizes, update numbers) must be equal.
"""
import pytest


def close(a, b, key: str) -> bool:
    if key == "clip_frac":
        return abs(a - b) <= 0.005
    if isinstance(b, int) and not isinstance(b, bool):
        return a == b
    return a == pytest.approx(b, rel=1e-4, abs=1e-6)


def mismatches(got, want, key: str = "", where: tuple = ()) -> list:
    """Each (where, got, want) in two logged structures (dicts, lists and numbers, nested) whose numbers are not
    ``close`` under the name of the innermost dict key above them, or whose keys or lengths differ."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return [(where, "keys", sorted(set(got) ^ set(want)) if isinstance(got, dict) else got)]
        return [m for k in want for m in mismatches(got[k], want[k], k, where + (k,))]
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            return [(where, "length", got, want)]
        return [m for i, (g, w) in enumerate(zip(got, want)) for m in mismatches(g, w, key, where + (i,))]
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return [] if isinstance(got, (int, float)) and close(got, want, key) else [(where, got, want)]
    return [] if got == want else [(where, got, want)]
