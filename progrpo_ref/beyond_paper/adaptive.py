r"""An adaptive prune schedule: prune only at steps whose previews are measured to be faithful.

The paper fixes Pro-GRPO's prune points (calls 5 and 7 of 10; its "checkpoints"). A fidelity audit
(``machinery/run.py``, every ``audit_every`` updates) measures, for each call c, the within-group Spearman rho_c between preview
and final rewards with its standard error se_c (``beyond_paper/fidelity.py``). With a target tau and z (one-sided):

    lower_c = rho_c - z se_c        (the evidence that c is good enough)
    upper_c = rho_c + z se_c        (the evidence that c is not)

Prune point i, after prune point i - 1 has been placed at p (p = 0 for the first), considers the calls c
with p < c < T and moves only on evidence:

    earlier  to the earliest c with lower_c >= tau, if that is before where it is;
    stays    if its current call c_i > p has upper_{c_i} >= tau (not shown to be bad: a noisy estimate
             does not move it);
    later    otherwise, to the earliest c > c_i with lower_c >= tau, else with upper_c >= tau;
    drops    if no such c exists: it and every later prune point become a selection on final rewards.

So prune points stay in increasing order. With prune points dropped, the run still expands to G_0 and
prunes at the prune points that remain; the trajectories the dropped ones would have cut are kept to the
end and the final K are chosen by OVF on their final rewards (with every prune point dropped: static OVF
of K out of G_0, "expand, then select on final rewards"). ``decide`` returns that schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..algorithm.pro_grpo import PruneSchedule


@dataclass(frozen=True)
class Placement:
    """What the trainer samples with: the pruning that remains, then a static OVF selection of
    ``select_k`` on final rewards if prune points were dropped (``selection == "ovf"``), else none."""

    schedule: PruneSchedule
    selection: str  # "all" or "ovf"
    select_k: int
    moves: tuple[str, ...]  # per original prune point: "earlier c -> c'", "stays c", "later c -> c'", "drops c", ...

    @property
    def calls(self) -> tuple[int | None, ...]:
        """Per original prune point, its call, or None if dropped: the ``current`` of the next ``decide``."""
        steps = self.schedule.prune_steps
        return tuple(steps) + (None,) * (len(self.moves) - len(steps))

    @classmethod
    def from_dict(cls, d: dict, num_steps: int) -> "Placement":
        """The inverse of ``to_dict`` (a placement read back from a history, for resume)."""
        schedule = PruneSchedule(tuple(d["group_sizes"]), tuple(d["prune_steps"]), num_steps)
        return cls(schedule, d["selection"], d["select_k"], tuple(d["moves"]))

    def to_dict(self) -> dict:
        return {"calls": list(self.calls), "group_sizes": list(self.schedule.group_sizes),
                "prune_steps": list(self.schedule.prune_steps), "selection": self.selection, "select_k": self.select_k,
                "moves": list(self.moves)}


def check_target(target: float, z: float) -> None:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not -1 <= target <= 1:
        raise ValueError(f"fidelity_target={target!r} must be a correlation in [-1, 1]")
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not (z >= 0 and math.isfinite(z)):
        raise ValueError(f"fidelity_z={z!r} must be a finite number >= 0")


def decide(base: PruneSchedule, current: tuple[int, ...], estimates: dict[int, dict], target: float,
           z: float = 1.645) -> Placement:
    """Place ``base``'s prune points (now at ``current``, one per prune point of ``base``; ``None`` for a
    dropped one) by the rule of the module docstring. ``estimates``: ``{call c: {"mean", "se"}}``; a call
    missing, or with a mean or standard error that is NaN or None (fewer than 2 groups), counts as neither
    shown good nor shown bad.

    z is a normal quantile: with n audited groups the t quantile is larger (2.35 for n = 4 at 95%), and the
    earliest of several calls is taken, so the bounds are optimistic for small audits; raise
    ``audit_prompts`` (or z) where that matters."""
    check_target(target, z)
    if len(current) != len(base.prune_steps):
        raise ValueError(f"current={current} must give one call (or None) per prune point of {base.prune_steps}")
    T = base.num_steps

    def bounds(c):  # an unmeasured call, or one without a standard error, is neither shown good nor shown bad
        e = estimates.get(c) or {}
        mean, se = e.get("mean"), e.get("se")
        if mean is None or se is None or math.isnan(mean) or math.isnan(se):
            return -math.inf, math.inf
        return mean - z * se, mean + z * se

    placed, moves, prev = [], [], 0
    for i, c_now in enumerate(current):
        calls = range(prev + 1, T)
        good = [c for c in calls if bounds(c)[0] >= target]
        if c_now is None:  # dropped before: it comes back only on evidence that a call is good
            new, move = (good[0], f"returns at {good[0]}") if good else (None, "stays dropped")
        elif good and good[0] < c_now:
            new, move = good[0], f"earlier {c_now} -> {good[0]}"
        elif c_now > prev and bounds(c_now)[1] >= target:
            new, move = c_now, f"stays {c_now}"
        else:
            later = [c for c in good if c > c_now] or [c for c in calls if c > c_now and bounds(c)[1] >= target]
            new, move = (later[0], f"later {c_now} -> {later[0]}") if later else (None, f"drops {c_now}")
        if new is None:  # this prune point and every later one become a selection on final rewards
            moves += [move] + [f"drops {c}" if c is not None else "stays dropped" for c in current[i + 1:]]
            break
        placed.append(new)
        moves.append(move)
        prev = new
    sizes = base.group_sizes[:len(placed) + 1]
    schedule = PruneSchedule(sizes, tuple(placed), T)
    dropped = len(placed) < len(base.prune_steps)
    return Placement(schedule, "ovf" if dropped else "all", base.final_size, tuple(moves))
