"""The OpenAPI 3.1 document of /api/v1 (served at /api/v1/openapi.json).

Kept beside the handlers and checked by the tests against real responses:
every route must be described, and every response a test receives must
validate against the schema documented for its status.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from consumer.health import STATUSES
from consumer.targets import KNOWN

_TS = {"type": ["string", "null"], "format": "date-time"}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    meaning = {
        400: "The request is malformed; the message says what to fix.",
        401: "No token, or an unknown or revoked one.",
        403: "The token's role is too low for this (or the body names another tenant).",
        404: "No such resource for this token's tenant (another tenant's is answered "
             "exactly the same way).",
        409: "A resync of this configuration is already running (the message names it).",
        503: "The broker or the database cannot be reached now; try again.",
    }
    return {str(s): _json(_ERROR_REF, meaning[s]) for s in statuses}


_ID_PARAM = {
    "name": "id", "in": "path", "required": True, "schema": {"type": "string"},
    "description": "The configuration id.",
}

_COMPONENTS: dict[str, Any] = {
    "securitySchemes": {
        "bearer": {
            "type": "http", "scheme": "bearer",
            "description": "A token from `absence-sync token create --tenant T --role R`.",
        }
    },
    "schemas": {
        "Error": {
            "type": "object", "required": ["error"], "additionalProperties": False,
            "properties": {"error": {
                "type": "object", "required": ["code", "message"], "additionalProperties": False,
                "properties": {
                    "code": {"type": "string", "examples": ["not_found"]},
                    "message": {"type": "string"},
                },
            }},
        },
        "Counts": {
            "type": "object", "additionalProperties": False,
            "required": ["pending", "synced", "failed", "deleted"],
            "properties": {s: {"type": "integer", "minimum": 0}
                           for s in ("pending", "synced", "failed", "deleted",
                                     "skipped_user_reply")},
        },
        "Sync": {
            "type": "object",
            "required": ["id", "tenant", "provider", "establishments", "health", "cause",
                         "consent_url", "warnings", "counts", "synced", "pending", "failed",
                         "last_success_at", "last_failure_at", "deleting", "paused"],
            "properties": {
                "id": {"type": "string"},
                "tenant": {"type": "string"},
                "provider": {"enum": ["microsoft365", "exchange", "google", "caldav", "ics"]},
                "establishments": {"type": ["array", "null"], "items": {"type": "string"},
                                   "description": "null: every establishment"},
                "health": {"enum": list(STATUSES), "description":
                           "ok; degraded (some mailboxes fail); failing (most mailboxes fail "
                           "with one cause that lies with the configuration); idle (nothing "
                           "was ever written). Judged over the last 24 hours of writes; "
                           "throttling is not a failure."},
                "cause": {"type": ["string", "null"],
                          "description": "A sentence that names the fix; null when ok."},
                "consent_url": {"type": ["string", "null"], "format": "uri", "description":
                                "Microsoft 365: the admin-consent link, when consent is "
                                "missing."},
                "warnings": {"type": "array", "items": {"type": "string"}},
                "counts": {"$ref": "#/components/schemas/Counts"},
                "synced": {"type": "integer", "minimum": 0,
                           "description": "Items written as wanted (= counts.synced)."},
                "pending": {"type": "integer", "minimum": 0,
                            "description": "Items waiting for a write (= counts.pending)."},
                "failed": {"type": "integer", "minimum": 0, "description":
                           "Items whose write failed permanently (= counts.failed)."},
                "counts_by_target": {
                    "type": "object", "description": "The same counts per target: calendar "
                    "(the employees' own calendars), team (the team calendar); only targets "
                    "that hold items.",
                    "additionalProperties": {"$ref": "#/components/schemas/Counts"},
                },
                "last_success_at": _TS,
                "last_failure_at": _TS,
                "deleting": {"type": "boolean", "description":
                             "A purge is deleting this configuration's events; it disappears "
                             "when none is left."},
                "paused": {"type": "boolean", "description":
                           "An operator paused it (`absence-sync config pause`): changes are "
                           "recorded and wait as pending writes; nothing is written until "
                           "`absence-sync config resume`."},
            },
        },
        "SyncDetail": {
            "allOf": [{"$ref": "#/components/schemas/Sync"}],
            "type": "object",
            "required": ["revision", "updated_at", "configuration", "secrets"],
            "properties": {
                "revision": {"type": "integer"},
                "updated_at": {"type": "string", "format": "date-time"},
                "configuration": {"$ref": "#/components/schemas/Configuration"},
                "secrets": {"type": "array", "items": {"type": "string"},
                            "description": "Names of the stored secrets (never values)."},
            },
        },
        "SyncList": {
            "type": "object", "required": ["syncs"], "additionalProperties": False,
            "properties": {"syncs": {"type": "array",
                                     "items": {"$ref": "#/components/schemas/Sync"}}},
        },
        "Configuration": {
            "type": "object", "required": ["provider"],
            "description": "A configuration in the shape of a `config apply` entry: the "
            "fields of a sync configuration plus a block named after the provider. In a "
            "request, `id` and `tenant` may be left out (they default to the URL's id and "
            "the token's tenant; another value is refused); secrets are given as values in "
            "the provider block (e.g. `\"password\": \"...\"`), never as `*_env` or "
            "`*_file`; a secret left out keeps its stored value, `null` removes it. "
            "Responses never hold a secret.",
            "properties": {
                "id": {"type": "string"},
                "tenant": {"type": "string"},
                "provider": {"enum": ["microsoft365", "exchange", "google", "caldav", "ics"],
                             "description": "ics: no remote calendar; the worker serves "
                             "the events as iCalendar feeds (see /syncs/{id}/feeds)."},
                "establishments": {"type": ["array", "null"], "items": {"type": "string"}},
                "hide_labels": {"type": "boolean"},
                "hidden_label": {"type": "string"},
                "whole_days_as_timed": {"type": "boolean"},
                "morning": {"type": "string", "examples": ["09:00-12:30"]},
                "afternoon": {"type": "string", "examples": ["13:30-18:00"]},
                "time_zone": {"type": "string"},
                "sync_pending": {"type": "boolean"},
                "busy_as": {"enum": ["busy", "oof"]},
                "free_as": {"enum": ["free", "workingElsewhere"]},
                "private": {"type": "boolean"},
                "category": {"type": ["string", "null"]},
                "types": {
                    "type": "object", "description": "Per leave type rules, keyed by the "
                    "events' `account.id`.",
                    "additionalProperties": {"$ref": "#/components/schemas/TypeRule"},
                },
                "microsoft365": {"type": "object"},
                "exchange": {"type": "object"},
                "google": {"type": "object"},
                "caldav": {"type": "object"},
                "ics": {"type": "object", "maxProperties": 0},
            },
        },
        "TypeRule": {
            "type": "object", "additionalProperties": False,
            "description": "Each field optional; left out, the configuration's value applies.",
            "properties": {
                "skip": {"type": "boolean", "description": "Never write this type; its "
                         "existing events are deleted."},
                "label": {"type": ["string", "null"], "maxLength": 255, "description":
                          "The subject, shown even when hide_labels is on."},
                "show_as": {"enum": ["free", "tentative", "busy", "oof", "workingElsewhere",
                                     None], "description": "Show-as of approved absences; "
                            "pending ones show tentative unless this is free or "
                            "workingElsewhere."},
                "sync_pending": {"type": ["boolean", "null"]},
                "private": {"type": ["boolean", "null"]},
                "category": {"type": ["string", "null"], "maxLength": 255,
                             "description": "\"\": no category for this type."},
            },
        },
        "Feed": {
            "type": "object",
            "required": ["id", "sync_id", "kind", "employee", "name", "created_at",
                         "last_used_at", "revoked", "revoked_at"],
            "properties": {
                "id": {"type": "string", "description": "Public id (to revoke it); not the "
                       "secret part of the URL."},
                "sync_id": {"type": "string"},
                "kind": {"enum": ["employee", "team"], "description": "employee: one "
                         "employee's events as their calendar would hold them; team: one "
                         "event per wanted absence, \"{name}: {label}\", always free."},
                "employee": {"type": ["string", "null"], "description": "The employee's "
                             "e-mail (lower case); null for the team feed."},
                "name": {"type": ["string", "null"], "description": "The calendar name "
                         "(NAME, X-WR-CALNAME); null: a default."},
                "created_at": {"type": "string", "format": "date-time"},
                "last_used_at": _TS,
                "revoked": {"type": "boolean"},
                "revoked_at": _TS,
            },
        },
        "NewFeed": {
            "allOf": [{"$ref": "#/components/schemas/Feed"}],
            "type": "object", "required": ["url"],
            "properties": {"url": {"type": "string", "format": "uri", "description":
                                   "The subscription link, shown only in this answer: "
                                   "ABSENCE_SYNC_PUBLIC_URL/feeds/TOKEN.ics."}},
        },
        "FeedList": {
            "type": "object", "required": ["feeds"], "additionalProperties": False,
            "properties": {"feeds": {"type": "array",
                                     "items": {"$ref": "#/components/schemas/Feed"}}},
        },
        "FeedRequest": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "employee": {"type": "string", "format": "email", "description": "A "
                             "personal feed of this employee (by e-mail); left out, the "
                             "configuration's team feed."},
                "name": {"type": "string", "maxLength": 255},
            },
        },
        "Item": {
            "type": "object", "additionalProperties": False,
            "required": ["absence_id", "target", "employee_email", "mailbox", "state", "code",
                         "message", "hint", "attempts", "event_id", "updated_at"],
            "properties": {
                "absence_id": {"type": "string"},
                "target": {"enum": list(KNOWN), "description": "Where the item writes: "
                           "calendar (the employee's own calendar) or team (the "
                           "configuration's team calendar)."},
                "employee_email": {"type": ["string", "null"]},
                "mailbox": {"type": ["string", "null"],
                            "description": "The calendar written (or to write)."},
                "state": {"enum": ["pending", "synced", "failed", "deleted",
                                    "skipped_user_reply"]},
                "code": {"type": ["string", "null"], "description": "Last error code: "
                         "mailbox_not_found, access_denied, auth_failed, consent_missing, "
                         "throttled, server_unreachable, tls_untrusted_certificate, "
                         "invalid_event or provider_error."},
                "message": {"type": ["string", "null"]},
                "hint": {"type": ["string", "null"], "description": "What to do about it."},
                "attempts": {"type": "integer", "minimum": 0},
                "event_id": {"type": ["string", "null"]},
                "updated_at": {"type": "string", "format": "date-time"},
            },
        },
        "ItemsPage": {
            "type": "object", "required": ["items", "next_cursor"], "additionalProperties": False,
            "properties": {
                "items": {"type": "array", "items": {"$ref": "#/components/schemas/Item"}},
                "next_cursor": {"type": ["string", "null"],
                                "description": "Pass as `cursor` for the next page; null at "
                                "the end."},
            },
        },
        "RetryRequest": {
            "type": "object", "additionalProperties": False,
            "properties": {"absence_ids": {"type": "array", "items": {"type": "string"}}},
        },
        "Requeued": {
            "type": "object", "required": ["requeued"], "additionalProperties": False,
            "properties": {"requeued": {"type": "integer", "minimum": 0}},
        },
        "ResyncRequest": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "since": {"type": "string", "format": "date",
                          "description": "Absences whose end date is on or after this date."},
                "establishments": {"type": "array", "items": {"type": "string"}},
                "dry_run": {"type": "boolean", "default": False},
                "force": {"type": "boolean", "default": False,
                          "description": "Rewrite events even when unchanged."},
            },
        },
        "InScope": {
            "type": "object", "required": ["in_scope"], "additionalProperties": False,
            "properties": {"in_scope": {"type": "integer", "minimum": 0, "description":
                                        "Events the resync would initialize."}},
        },
        "Job": {
            "type": "object",
            "required": ["id", "sync_id", "state", "phase", "since", "establishments", "force",
                         "read", "total", "in_scope", "marked", "done", "written", "unchanged",
                         "failed", "error", "started_at", "finished_at"],
            "properties": {
                "id": {"type": "string"},
                "job_id": {"type": "string", "description": "Same as id (in the 202 answer)."},
                "sync_id": {"type": "string"},
                "state": {"enum": ["running", "done", "failed"],
                          "description": "failed: `error` says why (written pairs stay)."},
                "phase": {"enum": ["starting", "reading", "selecting", "writing", "done"]},
                "since": {"type": ["string", "null"], "format": "date"},
                "establishments": {"type": ["array", "null"], "items": {"type": "string"}},
                "force": {"type": "boolean"},
                "read": {"type": "integer", "description": "Topic records read."},
                "total": {"type": "integer", "description": "Topic records to read."},
                "in_scope": {"type": "integer"},
                "marked": {"type": "integer"},
                "done": {"type": "integer", "description": "Marked absences processed."},
                "written": {"type": "integer"},
                "unchanged": {"type": "integer"},
                "failed": {"type": "integer"},
                "error": {"type": ["string", "null"]},
                "started_at": {"type": "string", "format": "date-time"},
                "finished_at": _TS,
            },
        },
        "Deleting": {
            "type": "object", "required": ["deleting", "events"], "additionalProperties": False,
            "properties": {
                "deleting": {"const": True},
                "events": {"type": "integer", "minimum": 1,
                           "description": "Events still to delete."},
            },
        },
    },
}


def _op(summary: str, role: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "summary": summary,
        "description": f"Role: `{role}` or higher.",
        "security": [{"bearer": []}],
        "responses": responses,
        **extra,
    }


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


_PATHS: dict[str, Any] = {
    "/syncs": {
        "get": _op("The tenant's sync configurations with their health", "read",
                   {"200": _json(_ref("SyncList"), "The configurations."), **_errors(401)}),
    },
    "/syncs/{id}": {
        "parameters": [_ID_PARAM],
        "get": _op("One configuration: health, counts and settings (never secrets)", "read",
                   {"200": _json(_ref("SyncDetail"), "The configuration."),
                    **_errors(401, 404)}),
        "put": _op(
            "Create or replace a configuration", "configure",
            {"200": _json(_ref("SyncDetail"), "Replaced."),
             "201": _json(_ref("SyncDetail"), "Created."), **_errors(400, 401, 403, 404)},
            requestBody={"required": True, "content": {
                "application/json": {"schema": _ref("Configuration")}}},
        ),
        "delete": _op(
            "Delete a configuration", "configure",
            {"202": _json(_ref("Deleting"), "Purge under way: the configuration is removed "
                          "once its events are deleted."),
             "204": {"description": "Deleted."}, **_errors(400, 401, 403, 404)},
            parameters=[{
                "name": "purge", "in": "query", "required": False,
                "schema": {"type": "boolean", "default": False},
                "description": "Also delete the calendar events this configuration wrote. "
                "Without it the events stay in the calendars.",
            }],
        ),
    },
    "/syncs/{id}/items": {
        "parameters": [_ID_PARAM],
        "get": _op(
            "Per absence: state, mailbox, last error with its hint", "read",
            {"200": _json(_ref("ItemsPage"), "One page, in absence id order."),
             **_errors(400, 401, 404)},
            parameters=[
                {"name": "state", "in": "query", "required": False,
                 "schema": {"enum": ["pending", "synced", "failed", "deleted",
                                             "skipped_user_reply"]}},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100}},
                {"name": "cursor", "in": "query", "required": False,
                 "schema": {"type": "string"}},
            ],
        ),
    },
    "/syncs/{id}/retry": {
        "parameters": [_ID_PARAM],
        "post": _op(
            "Re-queue failed items now (all, or the given absences)", "manage",
            {"200": _json(_ref("Requeued"), "How many were re-queued."),
             **_errors(400, 401, 403, 404)},
            requestBody={"required": False, "content": {
                "application/json": {"schema": _ref("RetryRequest")}}},
        ),
    },
    "/syncs/{id}/resync": {
        "parameters": [_ID_PARAM],
        "post": _op(
            "Synchronize again from a date: count first (dry_run), then start a job",
            "manage",
            {"200": _json(_ref("InScope"), "Dry run: the count, nothing touched."),
             "202": _json(_ref("Job"), "Started; follow it at /jobs/{id} (Location)."),
             **_errors(400, 401, 403, 404, 409, 503)},
            requestBody={"required": False, "content": {
                "application/json": {"schema": _ref("ResyncRequest")}}},
        ),
    },
    "/syncs/{id}/feeds": {
        "parameters": [_ID_PARAM],
        "get": _op("The iCalendar feed links of an ics configuration (never their URLs)",
                   "manage", {"200": _json(_ref("FeedList"), "The feeds, revoked ones too."),
                              **_errors(401, 403, 404)}),
        "post": _op(
            "Create a feed link: an employee's feed, or the team feed", "manage",
            {"201": _json(_ref("NewFeed"), "Created; the URL is shown this once."),
             **_errors(400, 401, 403, 404)},
            requestBody={"required": False, "content": {
                "application/json": {"schema": _ref("FeedRequest")}}},
        ),
    },
    "/syncs/{id}/feeds/{feed}": {
        "parameters": [_ID_PARAM, {"name": "feed", "in": "path", "required": True,
                                   "schema": {"type": "string"},
                                   "description": "The feed id."}],
        "delete": _op("Revoke a feed link: it answers 404 from now on", "manage",
                      {"204": {"description": "Revoked (or already revoked)."},
                       **_errors(401, 403, 404)}),
    },
    "/jobs/{id}": {
        "parameters": [{"name": "id", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "get": _op("A resync job's progress and summary", "read",
                   {"200": _json(_ref("Job"), "The job."), **_errors(401, 404)}),
    },
}


@cache
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "absence-sync administration API",
            "version": "1",
            "description": "Monitoring and administration of a tenant's sync configurations. "
            "Every call needs `Authorization: Bearer TOKEN`; a token belongs to one tenant and "
            "has a role: read (monitoring), manage (also retry and resync), configure (also "
            "create, edit and delete configurations). Another tenant's resources answer 404 "
            "exactly as if they did not exist.",
        },
        "servers": [{"url": "/api/v1"}],
        "paths": _PATHS,
        "components": _COMPONENTS,
    }


def document() -> dict[str, Any]:
    """A fresh copy (callers may change it)."""
    return copy.deepcopy(_document())
