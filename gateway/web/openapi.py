"""The OpenAPI description of /api/v1, served at /api/v1/openapi.json."""

from __future__ import annotations

from typing import Any

from gateway.store import devices as registry

_ERROR = {"description": "bad request: `field` names the input at fault",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_DEVICE = {"name": "device", "in": "path", "required": True, "schema": {"type": "string"}}


def _ok(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}


DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "Torpor gateway API", "version": "1",
             "description": "The data the gateway's web page shows, and the operator's actions. "
                            "Authenticate with `Authorization: Bearer <token>` or a login session "
                            "(then send X-CSRF-Token on changes)."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                            "session": {"type": "apiKey", "in": "cookie", "name": "torpor_session"}},
        "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {
            "error": {"type": "string"}, "field": {"type": "string", "nullable": True}}},
            "Wakes": {"type": "object", "properties": {
                "device": {"type": "string"}, "since": {"type": "number"},
                "until": {"type": "number"}, "energy_reported": {"type": "boolean"},
                "energy_model": {
                    "type": "object", "nullable": True,
                    "description": "the cited figures of the device's board (else of the "
                                   "default, [energy] board) the estimates use; `kind` is "
                                   "always \"model estimate\"",
                    "properties": {
                        "board": {"type": "string"}, "cpu_active_ma": {"type": "number"},
                        "radio_listen_ma": {"type": "number"},
                        "deep_sleep_ua": {"type": "number"}, "boot_ms": {"type": "number"},
                        "capacity_mah": {"type": "number"}, "empty_mv": {"type": "number"},
                        "kind": {"type": "string"}}},
                "wakes": {"type": "array", "items": {"type": "object", "properties": {
                    "seq": {"type": "integer"}, "at": {"type": "number"},
                    "boot_cause": {"type": "string"},
                    "battery_mv": {"type": "integer", "nullable": True},
                    "rssi": {"type": "integer", "nullable": True},
                    "readings": {"type": "integer"},
                    "seen_s": {"type": "number", "nullable": True},
                    "prev_awake_ms": {"type": "integer", "nullable": True},
                    "prev_radio_ms": {"type": "integer", "nullable": True},
                    "prev_sent": {"type": "integer", "nullable": True},
                    "boots_without_send": {"type": "integer", "nullable": True},
                    "energy_uah": {"type": "number", "nullable": True,
                                   "description": "the previous wake's charge in µAh: a "
                                                  "model estimate, not a measurement"}}}}}},
            "DeviceRow": {"type": "object", "properties": {
                "id": {"type": "string"}, "device_class": {"type": "string"},
                "board": {"type": "string", "nullable": True,
                          "description": "the device's board, a profile of "
                                         "boards/profiles.toml; null: not known ([energy] "
                                         "board stands in for its energy figures)"},
                "status": {"type": "string", "enum": list(registry.STATUSES)},
                "status_reason": {"type": "string"},
                "last_seen": {"type": "number", "nullable": True},
                "next_listen_at": {"type": "number", "nullable": True},
                "overdue_wakes": {"type": "integer"},
                "battery_mv": {"type": "integer", "nullable": True},
                "battery": {"type": "array", "items": {"type": "array",
                                                       "items": {"type": "integer"}}},
                "queued": {"type": "integer"},
                "fw_version": {"type": "integer", "nullable": True},
                "ota_state": {"type": "string", "nullable": True},
                "alerts": {"type": "integer"}, "group": {"type": "string", "nullable": True},
                "days_left": {"type": "number", "nullable": True},
                "days_left_pending": {"type": "boolean"},
                "days_left_source": {"type": "string", "nullable": True,
                                     "enum": ["ledger", "trend", None]},
                "days_left_trend": {"type": "string"}}},
            "Devices": {"type": "object", "properties": {
                "devices": {"type": "array", "items": {"$ref": "#/components/schemas/DeviceRow"}},
                "total": {"type": "integer"}, "offset": {"type": "integer"},
                "limit": {"type": "integer"},
                "counts": {"type": "object", "additionalProperties": {"type": "integer"}}}},
        },
    },
    "security": [{"bearer": []}, {"session": []}],
    "paths": {
        "/api/v1/devices": {"get": {
            "summary": "Devices, one page, filtered; each with its battery forecast "
                       "(`days_left`, null when unknown or not falling: see `days_left_trend`; "
                       "`days_left_source`: `ledger`, the energy ledger of its wakes, or "
                       "`trend`, the battery voltage trend)",
            "parameters": [
                {"name": "status", "in": "query", "schema": {"type": "string",
                                                             "enum": list(registry.STATUSES)}},
                {"name": "q", "in": "query", "schema": {"type": "string"},
                 "description": "substring of the id or status reason, or a firmware version"},
                {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                            "maximum": 1000}}],
            "responses": {"200": {"description": "devices, total matching, counts by status",
                                  "content": {"application/json": {"schema": {
                                      "$ref": "#/components/schemas/Devices"}}}},
                          "400": _ERROR}}},
        "/api/v1/devices/{device}": {"get": {
            "summary": "One device: state and board (`device`, `summary`: a DeviceRow), "
                       "wakes (`wake_log`, newest first), key rotations, "
                       "pending downlink, results, configuration",
            "parameters": [_DEVICE], "responses": {"200": _ok("the device"), "404": _ERROR}}},
        "/api/v1/devices/{device}/readings": {"get": {
            "summary": "Readings over a time range, one series per measurement",
            "parameters": [_DEVICE,
                           {"name": "since", "in": "query", "schema": {"type": "number"},
                            "description": "unix seconds (default: until - 1 day)"},
                           {"name": "until", "in": "query", "schema": {"type": "number"},
                            "description": "unix seconds (default: now)"},
                           {"name": "points", "in": "query", "schema": {"type": "integer"},
                            "description": "series are averaged down to this many points"}],
            "responses": {"200": _ok("series"), "400": _ERROR, "404": _ERROR}}},
        "/api/v1/devices/{device}/commands": {"post": {
            "summary": "Queue a command (checked as `torpor device command` checks it)",
            "parameters": [_DEVICE],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["op"], "properties": {
                    "op": {"type": "string"}, "args": {"type": "array", "items": {"type": "integer"}},
                    "priority": {"type": "integer"}, "ttl_s": {"type": "integer",
                                                               "nullable": True}}}}}},
            "responses": {"201": _ok("the queued item's id"), "400": _ERROR, "409": _ERROR}}},
        "/api/v1/devices/{device}/wakes": {"get": {
            "summary": "The device's logged wakes in a time range, oldest first: cause, battery, "
                       "RSSI, readings stored, time seen awake, OTA and key-rotation state, and "
                       "what each HELLO reported of the node's previous wake (`prev_awake_ms`, "
                       "`prev_radio_ms`, `prev_sent`; null before protocol 1.5) with its "
                       "`energy_uah`: a model estimate (those times × the `energy_model` "
                       "board's cited currents: the device's board, else [energy] board; "
                       "null without either), not a "
                       "measurement. `energy_reported`: some wake in the range reported them",
            "parameters": [_DEVICE,
                           {"name": "since", "in": "query", "schema": {"type": "number"},
                            "description": "unix seconds (default: until - 1 day)"},
                           {"name": "until", "in": "query", "schema": {"type": "number"},
                            "description": "unix seconds (default: now)"}],
            "responses": {"200": {"description": "wakes", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Wakes"}}}},
                          "400": _ERROR, "404": _ERROR}}},
        "/api/v1/devices/{device}/config": {"get": {
            "summary": "Desired configuration against what the node reported (its config "
                       "version, each key's reported value, the keys still pending)",
            "parameters": [_DEVICE],
            "responses": {"200": _ok("desired and reported configuration"), "404": _ERROR}},
                                            "post": {
            "summary": "Set desired configuration (delivered as one SHADOW_DELTA at the next wake)",
            "parameters": [_DEVICE],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["values"], "properties": {
                    "values": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "priority": {"type": "integer"}}}}}},
            "responses": {"201": _ok("the new configuration version"), "400": _ERROR}}},
        "/api/v1/devices/{device}/commands/{command_id}": {"delete": {
            "summary": "Cancel a queued or sent item",
            "parameters": [_DEVICE, {"name": "command_id", "in": "path", "required": True,
                                     "schema": {"type": "integer"}}],
            "responses": {"200": _ok("the item"), "409": _ERROR}}},
        "/api/v1/devices/{device}/release": {"post": {
            "summary": "Release a quarantined device", "parameters": [_DEVICE],
            "responses": {"200": _ok("the device"), "400": _ERROR}}},
        "/api/v1/deadletters": {"get": {
            "summary": "Dead letters, newest first, and refused-frame counts",
            "parameters": [{"name": "device", "in": "query", "schema": {"type": "string"}},
                           {"name": "limit", "in": "query", "schema": {"type": "integer"}}],
            "responses": {"200": _ok("letters")}}},
        "/api/v1/devices/{device}/group": {"put": {
            "summary": "Put the device in a group of the edge rules (null: in none)",
            "parameters": [_DEVICE],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["group"], "properties": {
                    "group": {"type": "string", "nullable": True}}}}}},
            "responses": {"200": _ok("the device and its group"), "400": _ERROR}}},
        "/api/v1/alerts": {"get": {
            "summary": "Alerts raised by the edge rules, newest first (docs/rules.md)",
            "parameters": [
                {"name": "state", "in": "query", "schema": {"type": "string",
                                                            "enum": ["open", "cleared"]}},
                {"name": "device", "in": "query", "schema": {"type": "string"}},
                {"name": "rule", "in": "query", "schema": {"type": "string"}},
                {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                            "maximum": 1000}}],
            "responses": {"200": _ok("alerts, total matching, open in all"), "400": _ERROR}}},
        "/api/v1/alerts/{alert_id}/clear": {"post": {
            "summary": "Clear an open alert by hand (a condition that still holds raises anew)",
            "parameters": [{"name": "alert_id", "in": "path", "required": True,
                            "schema": {"type": "integer"}}],
            "responses": {"200": _ok("the cleared alert"), "404": _ERROR}}},
        "/api/v1/health": {"get": {"summary": "Gateway, outbox and upstream health",
                                   "responses": {"200": _ok("health")}}},
        "/api/v1/campaigns": {"get": {
            "summary": "OTA campaigns, newest first, with their devices counted per state",
            "responses": {"200": _ok("campaigns")}}},
        "/api/v1/campaigns/{campaign}": {"get": {
            "summary": "One OTA campaign with every device's state and progress",
            "parameters": [{"name": "campaign", "in": "path", "required": True,
                            "schema": {"type": "integer"}}],
            "responses": {"200": _ok("campaign"), "404": _ERROR}}},
        "/api/v1/events": {"get": {
            "summary": "Server-sent events: `fleet` when devices, readings or queues change",
            "responses": {"200": {"description": "text/event-stream"}}}},
    },
}
