"""The OpenAPI 3 description of the message API (``GET /api/v1/openapi.json``)."""

from __future__ import annotations

from typing import Any

from imsrelay import __version__

_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(ref: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _param(name: str, description: str, *, kind: str = "string", where: str = "query", required: bool = False,
           **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "description": description,
            "schema": {"type": kind, **extra}}


_QUERY = _param("query", "search: from: to: subject: message-id: mailbox: site: after: before: and free text, "
                "combined with AND; quote values with spaces (subject:\"two words\")")
_START = _param("start", "index of the first message returned (0 = newest)", kind="integer", minimum=0)
_LIMIT = _param("limit", "how many messages at most (1-1000, default 50)", kind="integer", minimum=1, maximum=1000)
_ID = _param("id", "message id: SITE:MAILBOX:UNIQUE (from a listing)", where="path", required=True)
_SITE_PATH = _param("site", "site name (SiteA)", where="path", required=True)
_STD = {"400": _ERROR, "401": _ERROR}
# a site of several servers ([[servers]]; imsrelay.admin.federation): whole-site answers by default
_SERVER = _param("server", "only this server of a site of several servers (404 if the site has no such server)")
_LOCAL = _param("local", "1: this server's own answer only, not the site's other servers' (what the servers "
                "send each other)", kind="integer", enum=[0, 1])
_SERVERS = [_SERVER, _LOCAL]
SERVERS_REPORT = {"type": "object", "description": "a site of several servers: each server and whether it answered "
                  "(a server that did not answer is left out of the result, never an error of the request)",
                  "additionalProperties": {"type": "object", "properties": {
                      "ok": {"type": "boolean"}, "error": {"type": "string", "nullable": True}}}}

SUMMARY = {
    "type": "object",
    "required": ["id", "site", "mailbox", "from", "to", "subject", "size", "received", "read"],
    "properties": {
        "id": {"type": "string"}, "site": {"type": "string"}, "mailbox": {"type": "string"},
        "envelope_sender": {"type": "string", "nullable": True},
        "envelope_recipient": {"type": "string", "nullable": True},
        "from": {"type": "string"}, "to": {"type": "string"}, "cc": {"type": "string"},
        "subject": {"type": "string"}, "date": {"type": "string", "nullable": True},
        "message_id": {"type": "string", "nullable": True}, "size": {"type": "integer"},
        "received": {"type": "number", "description": "Unix time the message was delivered"},
        "received_iso": {"type": "string"}, "read": {"type": "boolean"},
        "server": {"type": "string", "description": "a site of several servers: the server holding it"},
        "lists": {"type": "string", "description": "the distribution lists it came through (comma-separated); "
                  "`to:` finds it by them too"},
    },
}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "imsrelay message API", "version": __version__,
                 "description": "Mailboxes, messages, search, long-poll wait and message tracking of imsrelay "
                                "sites (each site's admin endpoint) or of a whole embedded lab (the lab endpoint). "
                                "Every path but /health, /ready and this document needs "
                                "`Authorization: Bearer <admin token>`."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            "/health": {"get": {"summary": "the process is alive", "security": [],
                                "responses": {"200": {"description": "alive"}}}},
            "/ready": {"get": {"summary": "ready: listening, spool recovered, directory provisioned, lab stage reached",
                               "security": [],
                               "responses": {"200": _json("Ready"), "503": _json("Ready", "not ready, with reasons")}}},
            "/api/v1/openapi.json": {"get": {"summary": "this document", "security": [],
                                             "responses": {"200": {"description": "OpenAPI 3 document"}}}},
            "/api/v1/sites": {"get": {"summary": "the sites this endpoint answers for",
                                      "responses": {"200": _json("Sites"), **_STD}}},
            "/api/v1/sites/{site}/queue": {"get": {
                "summary": "a site's queue (every server's, on a site of several servers)",
                "parameters": [_SITE_PATH, *_SERVERS],
                "responses": {"200": _json("Queue"), "404": _ERROR, **_STD}}},
            "/api/v1/sites/{site}/replication": {"get": {
                "summary": "a site's directory replication state", "parameters": [_SITE_PATH],
                "responses": {"200": {"description": "replication state",
                                      "content": {"application/json": {"schema": {"type": "object"}}}},
                              "404": _ERROR, **_STD}}},
            "/api/v1/mailboxes": {"get": {
                "summary": "mailboxes (Maildirs) and their message counts",
                "parameters": [_param("site", "only this site"), *_SERVERS],
                "responses": {"200": _json("Mailboxes"), "404": _ERROR, **_STD}}},
            "/api/v1/messages": {"get": {
                "summary": "messages, newest first, paginated",
                "parameters": [_param("site", "only this site"), _param("mailbox", "only this mailbox (alias)"),
                               _QUERY, _START, _LIMIT, *_SERVERS],
                "responses": {"200": _json("Page"), "404": _ERROR, **_STD}}},
            "/api/v1/search": {
                "get": {"summary": "messages matching a search, newest first",
                        "parameters": [{**_QUERY, "required": True}, _START, _LIMIT, *_SERVERS],
                        "responses": {"200": _json("Page"), **_STD}},
                "delete": {"summary": "delete every message matching a search",
                           "parameters": [{**_QUERY, "required": True}, *_SERVERS],
                           "responses": {"200": _json("Deleted"), **_STD}}},
            "/api/v1/wait": {"get": {
                "summary": "long-poll: answers as soon as a message matches (at once if one does already)",
                "parameters": [_QUERY, _param("timeout", "seconds to wait (default 30, at most 300)",
                                              kind="number", minimum=0), _LIMIT, *_SERVERS],
                "responses": {"200": _json("Page"), "408": _ERROR, **_STD}}},
            "/api/v1/messages/{id}": {
                "get": {"summary": "one message: headers, decoded text and HTML, attachments",
                        "parameters": [_ID], "responses": {"200": _json("Message"), "404": _ERROR, "401": _ERROR}},
                "patch": {"summary": "set or clear the read (Maildir S) flag", "parameters": [_ID],
                          "requestBody": {"required": True, "content": {"application/json": {"schema": {
                              "type": "object", "required": ["read"],
                              "properties": {"read": {"type": "boolean"}}}}}},
                          "responses": {"200": _json("Summary"), "404": _ERROR, **_STD}},
                "delete": {"summary": "delete one message", "parameters": [_ID],
                           "responses": {"200": _json("Deleted"), "404": _ERROR, "401": _ERROR}}},
            "/api/v1/messages/{id}/raw": {"get": {
                "summary": "the message file as stored (.eml)", "parameters": [_ID],
                "responses": {"200": {"description": "the Maildir file's bytes",
                                      "content": {"message/rfc822": {"schema": {"type": "string", "format": "binary"}}}},
                              "404": _ERROR, "401": _ERROR}}},
            "/api/v1/tracking": {"get": {
                "summary": "message tracking: every event of the matching messages and their hop chains",
                "parameters": [_param("message_id", "Message-ID (with or without <>)"),
                               _param("queue_id", "a site's queue id"), _param("sender", "envelope sender"),
                               _param("recipient", "envelope recipient"),
                               _param("since", "from this time (2026-12-01, ISO time or Unix time)"),
                               _param("until", "up to this time"),
                               _param("limit", "messages per site (1-1000)", kind="integer", minimum=1, maximum=1000),
                               *_SERVERS],
                "responses": {"200": _json("Tracking"), **_STD}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "Ready": {"type": "object", "required": ["ready", "reasons", "checks"], "properties": {
                    "ready": {"type": "boolean"}, "reasons": {"type": "array", "items": {"type": "string"}},
                    "checks": {"type": "array", "items": {"type": "object", "properties": {
                        "name": {"type": "string"}, "ok": {"type": "boolean"},
                        "reason": {"type": "string", "nullable": True}}}}}},
                "Sites": {"type": "object", "properties": {"sites": {"type": "array", "items": {
                    "type": "object", "properties": {
                        "site": {"type": "string"}, "hostname": {"type": "string"},
                        "smtp": {"type": "object", "properties": {"host": {"type": "string"},
                                                                  "port": {"type": "integer", "nullable": True}}},
                        "access": {"type": "object", "nullable": True,
                                   "description": "IMAP4 and POP3 (null: off; unavailable: why not running)",
                                   "properties": {"host": {"type": "string"}, "imap": {"type": "integer"},
                                                  "imaps": {"type": "integer"}, "pop3": {"type": "integer"},
                                                  "pop3s": {"type": "integer"}, "unavailable": {"type": "string"}}},
                        "ready": {"type": "boolean"}}}}}},
                "Queue": {"type": "object", "properties": {"site": {"type": "string"},
                                                           "messages": {"type": "array", "items": {"type": "object"}},
                                                           "servers": SERVERS_REPORT}},
                "Mailboxes": {"type": "object", "properties": {"mailboxes": {"type": "array", "items": {
                    "type": "object", "properties": {
                        "site": {"type": "string"}, "mailbox": {"type": "string"}, "messages": {"type": "integer"},
                        "unread": {"type": "integer"}, "size": {"type": "integer"}}}}}},
                "Summary": SUMMARY,
                "Page": {"type": "object", "required": ["total", "start", "count", "messages"], "properties": {
                    "total": {"type": "integer"}, "start": {"type": "integer"}, "count": {"type": "integer"},
                    "messages": {"type": "array", "items": {"$ref": "#/components/schemas/Summary"}},
                    "servers": SERVERS_REPORT}},
                "Message": {"allOf": [{"$ref": "#/components/schemas/Summary"}, {"type": "object", "properties": {
                    "headers": {"type": "array", "items": {"type": "object", "properties": {
                        "name": {"type": "string"}, "value": {"type": "string"}}}},
                    "text": {"type": "string", "nullable": True}, "html": {"type": "string", "nullable": True},
                    "attachments": {"type": "array", "items": {"type": "object", "properties": {
                        "filename": {"type": "string", "nullable": True}, "content_type": {"type": "string"},
                        "size": {"type": "integer"}}}}}}]},
                "Deleted": {"type": "object", "required": ["deleted"], "properties": {"deleted": {"type": "integer"}}},
                "Tracking": {"type": "object", "required": ["events", "messages"], "properties": {
                    "events": {"type": "array", "items": {"type": "object", "properties": {
                        "time": {"type": "number"}, "site": {"type": "string"}, "event": {"type": "string"},
                        "queue_id": {"type": "string"}, "message_id": {"type": "string", "nullable": True},
                        "recipient": {"type": "string", "nullable": True}, "detail": {"type": "object"},
                        "server": {"type": "string", "description": "a site of several servers: whose log"}}}},
                    "servers": SERVERS_REPORT,
                    "messages": {"type": "array", "items": {"type": "object", "properties": {
                        "message_id": {"type": "string", "nullable": True},
                        "chain": {"type": "array", "items": {"type": "string"}},
                        "hops": {"type": "array", "items": {"type": "object"}},
                        "recipients": {"type": "array", "items": {"type": "object", "properties": {
                            "recipient": {"type": "string"}, "state": {"type": "string"},
                            "site": {"type": "string"}, "detail": {"type": "string"}}}}}}}}},
            },
        },
    }
