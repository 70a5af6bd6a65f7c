"""What a subscription covers: one workflow, a list, a tenant or a tree.

`Scope` is checked here once — exactly one kind, a well-formed value — for
every transport and every reader. It also carries the visibility decision
(core/subscribe.py `authorize`): a scope with a `viewer` (the token's
`Grant`) contains only the workflows that grant may see, so every reader
(single, multi-workflow, snapshots, ends) applies the same rule.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .claims import Grant
from .entry import Entry
from .errors import InvalidArgument

WORKFLOW = "workflow"  # one workflow: its ring (WorkflowReader)
WORKFLOWS = "workflows"  # the rest read the node journal (MultiReader)
TENANT = "tenant"
PARENT = "parent"
KINDS = (WORKFLOW, WORKFLOWS, TENANT, PARENT)
MULTI_KINDS = (WORKFLOWS, TENANT, PARENT)


@dataclass(frozen=True, slots=True)
class Scope:
    kind: str
    # WORKFLOW, TENANT, PARENT: the id or name; WORKFLOWS: the ids.
    value: str | frozenset[str]
    # Who reads it (None: no authentication): only what this grant may see
    # is in scope; another tenant's workflow is as if it did not exist.
    viewer: Grant | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgument(f"unknown scope {self.kind!r}")
        if self.kind == WORKFLOWS:
            ok = isinstance(self.value, frozenset) and bool(self.value) and all(self.value)
            if not ok:
                raise InvalidArgument("'workflows' must list at least one workflow id")
        elif not isinstance(self.value, str) or not self.value:
            raise InvalidArgument(f"'{self.kind}' must be a non-empty string")

    @property
    def multi(self) -> bool:
        """Read from the node journal (every kind but one workflow)."""
        return self.kind != WORKFLOW

    @property
    def name(self) -> str:
        """The one id or name of a WORKFLOW, TENANT or PARENT scope."""
        assert isinstance(self.value, str)
        return self.value

    @property
    def ids(self) -> frozenset[str]:
        """The ids of a WORKFLOWS scope."""
        assert isinstance(self.value, frozenset)
        return self.value

    def sees(self, tenant: str, workflow_id: str) -> bool:
        """Whether the viewer may see this workflow at all."""
        viewer = self.viewer
        return viewer is None or viewer.may_see(tenant, workflow_id)

    def contains(self, e: Entry) -> bool:
        """Whether a journal entry lies in this (multi-workflow) scope."""
        viewer = self.viewer
        if viewer is not None and not viewer.may_see(e.tenant, e.workflow_id):
            return False
        kind = self.kind
        if kind == WORKFLOWS:
            return e.workflow_id in self.value
        if kind == TENANT:
            return e.tenant == self.value
        if kind == PARENT:
            return e.workflow_id == self.value or self.value in e.ancestors
        return e.workflow_id == self.value

    @classmethod
    def pick(cls, given: Mapping[str, object], allowed: Iterable[str] = KINDS) -> Scope:
        """The one scope among `given` (kind → value, only those present).
        Values are already in the model's types: str, or frozenset for
        WORKFLOWS."""
        allowed = tuple(allowed)
        present = [k for k in allowed if k in given]
        if len(present) != 1 or any(k not in allowed for k in given):
            raise InvalidArgument("give exactly one of " + ", ".join(allowed))
        kind = present[0]
        value = given[kind]
        if not isinstance(value, (str, frozenset)):
            raise InvalidArgument(f"'{kind}' must be a non-empty string")
        return cls(kind, value)
