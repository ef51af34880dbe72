"""Who may act: operators for train/expose/request/schedule, approvers for decisions."""

from __future__ import annotations

from typing import Callable, Iterable

from model_registry.config import ModelPolicy
from model_registry.domain.errors import Refused

MembersOf = Callable[[str], Iterable[str]]  # user-group id -> member user ids


def is_group(ident: str) -> bool:
    return ident.startswith("S") and ident[1:].isalnum() and ident.isupper()


def is_listed(user: str, idents: Iterable[str], members_of: MembersOf) -> bool:
    for ident in idents:
        if ident == user or (is_group(ident) and user in set(members_of(ident))):
            return True
    return False


def check_operator(policy: ModelPolicy, user: str, members_of: MembersOf, action: str, model: str) -> None:
    if policy.operators and not is_listed(user, policy.operators, members_of):
        raise Refused(
            f"{user} may not {action} {model}: not an operator of {model}",
            "ask an operator listed in starchart.yaml, or to be added to `operators`",
            reason="not_operator",
        )


def check_approver(
    policy: ModelPolicy, user: str, members_of: MembersOf, requested_by: str, trained_by: str, model: str,
    approvers: tuple[str, ...] | None = None, needs: str | None = None,
) -> None:
    """Raise Refused unless `user` may decide on a promotion request of `model`; nobody (an empty id) never may.

    `approvers`: who may decide on this request in place of the model's approvers (its approval rules), with
    `needs` saying what the rules ask for."""
    if not user.strip():  # an unknown person must not pass a policy that lists no approvers
        raise Refused("a decision needs a known person; this one came without a user id",
                      "decide from Slack or the console as yourself", reason="no_user")
    listed = policy.approvers if approvers is None else approvers
    if listed and not is_listed(user, listed, members_of):
        raise Refused(
            f"{user} is not an approver of {model}" if approvers is None else
            f"{user} is not an approver of this request: {needs}",
            "ask one of: " + ", ".join(listed),
            reason="not_approver",
        )
    if not policy.allow_self_approval and user in (requested_by, trained_by):
        who = "requested this promotion" if user == requested_by else "trained the candidate"
        raise Refused(
            f"{user} {who} and may not approve it (self-approval is off)",
            "ask another approver to review it",
            reason="self_approval",
        )
