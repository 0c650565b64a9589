"""The ``acsp grants`` option behind each request field that the grant service may reject."""

from __future__ import annotations

from typing import Final

APPLICATION_ARGUMENT: Final = "the application argument"
GRANT_ARGUMENT: Final = "the grant argument"
FIELD_OPTIONS: Final[dict[str, dict[str, str]]] = {
    "institution": {
        "institution.institution_id": "the institution_id argument",
        "institution.display_name": "the name argument",
        "institution.country_code": "--country",
    },
    "project": {
        "project.project_id": "the project_id argument",
        "project.institution_id": "--institution",
        "project.pi_subject": "--pi",
        "project.display_name": "--name",
        "project.members": "--member",
        "project.members.subject": "--member",
        "project.members.role": "--member",
    },
    "member": {
        "project_id": "the project argument",
        "subject": "the subject argument",
        "member.subject": "the subject argument",
        "member.role": "--role",
    },
    "apply": {
        "application.project_id": "--project",
        "application.tier": "--tier",
        "application.requested_pf_days": "--pf-days",
        "application.validity": "--start and --end",
        "application.validity.start_time": "--start",
        "application.validity.end_time": "--end",
        "application.justification": "--justification",
        "application.accelerator_models": "--model",
        "application.regions": "--region",
    },
    "assign": {
        "application_id": APPLICATION_ARGUMENT,
        "reviewer_subject": "--reviewer",
        "reviewer_institution_id": "--institution",
    },
    "review": {
        "application_id": APPLICATION_ARGUMENT,
        "score": "--score",
        "comments": "--comments",
    },
    "award": {
        "application_id": APPLICATION_ARGUMENT,
        "decision.outcome": "--outcome",
        "decision.reason": "--reason",
        "decision.awarded_pf_days": "--pf-days, with --outcome award-less",
        "constraints.providers": "--provider",
        "constraints.regions": "--region",
        "constraints.accelerator_models": "--model",
    },
    "show": {"grant_id": GRANT_ARGUMENT},
    "balance": {"grant_id": GRANT_ARGUMENT, "sub_allocation_id": "--sub-allocation"},
    "history": {"grant_id": GRANT_ARGUMENT, "page.page_token": "--after"},
    "delegate": {
        "grant_id": GRANT_ARGUMENT,
        "holder": "--holder",
        "amount_pf_days": "--pf-days",
        "parent_sub_allocation_id": "--parent",
    },
    "suballocations": {"grant_id": GRANT_ARGUMENT},
    "supplement": {"grant_id": GRANT_ARGUMENT, "amount_pf_days": "--pf-days", "reason": "--reason"},
    "extend": {"grant_id": GRANT_ARGUMENT, "new_end_time": "--end", "reason": "--reason"},
}
"""The option of each ``acsp grants`` command that sets each request field the grant service
may reject, by command. ``request_id`` is ``--request-id`` in every command."""
