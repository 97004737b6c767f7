"""The review page (issue 14): events per camera with their snapshots, and the operator's verdicts.

``interneg ui`` serves it, with the recorder (:mod:`workers.review_recorder`) filling the
store in a thread beside it. "Normal" publishes the event's best-frame embedding as an
allow-list entry on ``ood.control`` (acknowledged by the broker before the verdict is
stored), which every scoring worker applies from its next batch; "confirmed" is stored only.

The page has no login: it binds to loopback unless told otherwise, like the workers' ops
endpoints. A verdict must be posted as JSON, which a cross-site form cannot do.
"""
from __future__ import annotations

import hashlib
import json
import time
from importlib import resources
from typing import Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from schemas.messages import AllowEntry, Vector
from workers.review_store import VERDICTS, ReviewStore

PAGE = resources.files("workers").joinpath("review_page/index.html")


MAX_VERDICT_BYTES = 4096  # {"verdict": "confirmed"} is 24


def allow_entry_for(event: dict, embedding: dict, by: str, now_ms: int) -> AllowEntry:
    """The allow-list entry a "normal" makes: the event's camera only, named after the event."""
    entry_id = "ev-normal-" + hashlib.sha256(event["event_id"].encode()).hexdigest()[:16]
    note = f"normal: {event['id_class']}"[:1024]  # the class comes from a record, the note's length is bounded
    return AllowEntry(entry_id=entry_id, camera_id=event["camera_id"], embedding=Vector.model_validate(embedding),
                      event_id=event["event_id"], note=note, by=by, added_ms=now_ms)


class RefuseNul:
    """A request whose path or query holds a NUL answers 400: PostgreSQL's text cannot hold
    one, so the store would raise (a 500) on the id or filter it names."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and ("\x00" in scope["path"] or b"%00" in scope["query_string"]):
            await JSONResponse({"error": "no NUL characters in a request"}, status_code=400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def make_app(store: ReviewStore, publish: Callable[[AllowEntry], None], operator: str) -> Starlette:
    page = PAGE.read_text()
    # The store's calls block (SQLite, PostgreSQL): the handlers are plain functions, which
    # Starlette runs in its thread pool, off the event loop; the async one hands its blocking
    # calls to that pool too.

    def index(request: Request) -> Response:
        return HTMLResponse(page)

    def cameras(request: Request) -> Response:
        return JSONResponse(store.cameras())

    def events(request: Request) -> Response:
        q = request.query_params
        try:
            limit = int(q.get("limit", "200"))
        except ValueError:
            return JSONResponse({"error": "limit must be a number"}, status_code=400)
        return JSONResponse(store.events(camera=q.get("camera") or None, status=q.get("status") or None,
                                         verdict=q.get("verdict") or None, limit=limit))

    def event(request: Request) -> Response:
        found = store.event(request.path_params["event_id"])
        return JSONResponse(found) if found is not None else JSONResponse({"error": "no such event"}, status_code=404)

    def thumbnail(request: Request) -> Response:
        jpeg = store.thumbnail(request.path_params["event_id"])
        if jpeg is None:
            return JSONResponse({"error": "no snapshot"}, status_code=404)
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=5"})

    async def verdict(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "post the verdict as application/json"}, status_code=415)
        body = b""
        async for chunk in request.stream():  # read no more than a verdict can be, whatever content-length says
            body += chunk
            if len(body) > MAX_VERDICT_BYTES:
                return JSONResponse({"error": f"a verdict is at most {MAX_VERDICT_BYTES} bytes"}, status_code=413)
        try:
            value = json.loads(body)["verdict"]
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):  # RecursionError: [[[[...]]]]
            return JSONResponse({"error": 'expected {"verdict": "normal" | "confirmed"}'}, status_code=400)
        if value not in VERDICTS:
            return JSONResponse({"error": f"verdict must be one of {', '.join(VERDICTS)}"}, status_code=400)
        event_id = request.path_params["event_id"]
        found = store.event(event_id)
        if found is None:
            return JSONResponse({"error": "no such event"}, status_code=404)
        now_ms = int(time.time() * 1000)
        answer = {"event_id": event_id, "verdict": value}
        if value == "normal":
            embedding = store.embedding(event_id)
            if embedding is None:
                return JSONResponse({"error": "this event carries no embedding to allow-list"}, status_code=409)
            entry = allow_entry_for(found, embedding, operator, now_ms)
            await run_in_threadpool(publish, entry)  # acknowledged before the verdict is stored: a stored "normal" is one the workers get
            answer["allow_entry"] = entry.entry_id
        await run_in_threadpool(store.set_verdict, event_id, value, operator, now_ms)
        return JSONResponse(answer)

    def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/", index),
        Route("/healthz", healthz),
        Route("/api/cameras", cameras),
        Route("/api/events", events),
        Route("/api/events/{event_id}", event),
        Route("/api/events/{event_id}/thumbnail", thumbnail),
        Route("/api/events/{event_id}/verdict", verdict, methods=["POST"]),
    ], middleware=[Middleware(RefuseNul)])
