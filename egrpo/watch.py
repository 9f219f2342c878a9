"""The hacking watch (``eval.check``): rewards scored at every held-out evaluation and never trained on.

A policy that games its reward (grey backgrounds for a density reward, saturated colours for an aesthetic one)
raises that reward while what it was meant to stand for falls. So each evaluation compares, with the base
model's evaluation, the trained reward and every check: the trained reward risen and a check fallen by more
than ``eval.hack_margin`` of its base value is reward hacking.
"""

from __future__ import annotations


def fallen_checks(base: dict, now: dict, checks: list[str], margin: float) -> list[str]:
    """The checks whose held-out value fell by more than ``margin`` of its base value's magnitude."""
    fallen = []
    for name in checks:
        key = f"check_{name}"
        if key in base and key in now and now[key] < base[key] - margin * abs(base[key]):
            fallen.append(name)
    return fallen


def hacked(base: dict, now: dict, fallen: list[str]) -> bool:
    """Reward hacking: checks fell (:func:`fallen_checks`) while the trained reward rose."""
    return bool(fallen) and now["reward"] > base["reward"]


def describe(iteration: int, base: dict, now: dict, fallen: list[str], margin: float) -> str:
    checks = ", ".join(f"{n} {base[f'check_{n}']:.3f} -> {now[f'check_{n}']:.3f}" for n in fallen)
    return (f"iteration {iteration}: reward hacking: the trained reward rose {base['reward']:.3f} -> "
            f"{now['reward']:.3f} while {checks} fell by more than eval.hack_margin={margin:g} of the base's")
