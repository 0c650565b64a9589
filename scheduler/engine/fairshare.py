"""Hierarchical fair share: program -> institution -> project, on decayed usage.

Usage is accelerator-seconds (in millis) decayed with a half-life, so what a project ran an
hour ago weighs less than what it runs now. At each level an account is ranked by its share of
its siblings' usage over its share of their weights. The queue serves the lowest first, level
by level from the top, and an account with zero weight sorts last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from scheduler.engine.spec import InvalidInputError

FairShareKey = tuple[float, float, float]


class Level(StrEnum):
    PROGRAM = "program"
    INSTITUTION = "institution"
    PROJECT = "project"


@dataclass(slots=True)
class _Account:
    weight: float | None = None
    usage: float = 0.0
    """Decayed millis x seconds."""
    rate: int = 0
    """Millis running now."""
    children: set[str] = field(default_factory=set)


class FairShare:
    """Decayed usage and weights of every account, and the ordering key they give."""

    def __init__(self, half_life_s: float, default_weight: float) -> None:
        self._decay_per_s = math.log(2) / half_life_s
        self._default_weight = default_weight
        self._accounts: dict[tuple[Level, str], _Account] = {}
        self._parent: dict[tuple[Level, str], tuple[Level, str] | None] = {}
        self._clock: float | None = None
        self._chains: dict[str, tuple[_Account, ...]] = {}
        self._total_weights: dict[tuple[Level, str], float] = {}
        """Cached sum of the children's weights per parent; cleared when weights change."""

    def set_weight(self, level: Level, name: str, weight: float) -> None:
        """Set an account's weight (from its grants); 0 puts its jobs last."""
        if weight < 0 or math.isnan(weight):
            raise InvalidInputError(f"weight of {level} {name!r}: {weight} must be >= 0")
        self._account(level, name).weight = weight
        self._total_weights.clear()

    def register(self, project: str, institution: str, program: str) -> None:
        """Record where a project sits; a project belongs to one institution and program."""
        key = (Level.PROJECT, project)
        if key in self._parent:
            return
        self._parent[(Level.PROGRAM, program)] = None
        self._parent[(Level.INSTITUTION, institution)] = (Level.PROGRAM, program)
        self._parent[key] = (Level.INSTITUTION, institution)
        # An institution may have moved to another program: rebuild every chain.
        self._chains.clear()
        self._account(Level.PROGRAM, "").children.add(program)
        self._account(Level.PROGRAM, program).children.add(institution)
        self._account(Level.INSTITUTION, institution).children.add(project)
        self._account(Level.PROJECT, project)
        self._total_weights.clear()

    def advance(self, now: float) -> None:
        """Decay every account to ``now`` and add what ran since the last call."""
        if self._clock is None or now <= self._clock:
            self._clock = now if self._clock is None else max(self._clock, now)
            return
        elapsed = now - self._clock
        self._clock = now
        factor = math.exp(-self._decay_per_s * elapsed)
        # A constant rate r over the interval, decayed, adds r * (1 - factor) / lambda.
        accrual = (1.0 - factor) / self._decay_per_s
        for account in self._accounts.values():
            account.usage = account.usage * factor + account.rate * accrual

    def add_running(self, project: str, millis: int) -> None:
        """Change the millis a project (and its parents) run now; negative when jobs stop."""
        for account in self._chain(project):
            account.rate += millis

    def charge(self, project: str, usage: float) -> None:
        """Add usage at once, e.g. for a job admitted in the current pass."""
        for account in self._chain(project):
            account.usage += usage

    def _chain(self, project: str) -> tuple[_Account, ...]:
        """Return the accounts of a project and of its parents up to the root."""
        chain = self._chains.get(project)
        if chain is None:
            accounts = []
            key: tuple[Level, str] | None = (Level.PROJECT, project)
            while key is not None:
                accounts.append(self._account(*key))
                key = self._parent.get(key)
            chain = tuple(accounts)
            if (Level.PROJECT, project) in self._parent:
                # Only a registered project's parents are final.
                self._chains[project] = chain
        return chain

    def usage(self, level: Level, name: str) -> float:
        return self._account(level, name).usage

    def key(self, project: str) -> FairShareKey:
        """Return ``(program, institution, project)`` normalised usage; lower is served first.

        Each part is usage over the account's share of its siblings' weights. Siblings share
        the total of their usage, so this orders them as usage share over weight share does,
        and charging one project only raises its own and its parents' parts.
        """
        project_key = (Level.PROJECT, project)
        institution_key = self._parent[project_key]
        assert institution_key is not None
        program_key = self._parent[institution_key]
        assert program_key is not None
        return (
            self._normalised(program_key, (Level.PROGRAM, "")),
            self._normalised(institution_key, program_key),
            self._normalised(project_key, institution_key),
        )

    def parent(self, level: Level, name: str) -> str:
        """Return the institution of a project or the program of an institution."""
        parent = self._parent[(level, name)]
        assert parent is not None
        return parent[1]

    def component(self, level: Level, name: str) -> float:
        """Return one account's part of :meth:`key`, compared only with its siblings."""
        key = (level, name)
        parent = self._parent[key] if level is not Level.PROGRAM else None
        return self._normalised(key, parent or (Level.PROGRAM, ""))

    def _normalised(self, key: tuple[Level, str], parent_key: tuple[Level, str]) -> float:
        account = self._account(*key)
        weight = self._weight(account)
        if weight == 0:
            return math.inf
        total_weight = self._total_weights.get(parent_key)
        if total_weight is None:
            children = self._account(*parent_key).children
            total_weight = sum(self._weight(self._account(key[0], name)) for name in children)
            self._total_weights[parent_key] = total_weight
        return account.usage * total_weight / weight

    def _weight(self, account: _Account) -> float:
        return self._default_weight if account.weight is None else account.weight

    def _account(self, level: Level, name: str) -> _Account:
        account = self._accounts.get((level, name))
        if account is None:
            account = _Account()
            self._accounts[(level, name)] = account
        return account
