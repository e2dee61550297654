"""HTTP JSON service (FastAPI + uvicorn, the optional ``serve`` extra).

Endpoints: ``POST /recommend``, ``POST /recommend/batch``, ``GET /health``, ``GET /model``,
``GET /items?q=`` (title search for the demo page), ``GET /`` (the demo page),
``GET /openapi.json`` and ``/docs`` (the schema). Concurrent requests are micro-batched: the
first waiting request opens a window of ``max_wait_ms``; everything that arrives in it (up to
``max_batch`` queries) is scored in one forward pass in a worker thread.

Bad input never reaches the model: malformed JSON is a 400, a body over ``max_body_bytes`` a
413, wrong types and invalid values (empty history, k out of range, unsorted timestamps,
unknown items under ``reject``) a 422, each with ``{"error": "<what and how to fix it>"}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Literal

from .recommender import Prepared, Query, Recommender, RequestError

log = logging.getLogger(__name__)

try:  # optional dependency
    from fastapi import FastAPI, Request
    from fastapi import Query as QueryParam
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as exc:  # pragma: no cover - exercised when the extra is missing
    raise ImportError("the HTTP service needs FastAPI and uvicorn: pip install 'fuxi-mme[serve]'") from exc


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field ("top_k") is an error, not a silent default

    history: list[int | str | list[int | str]] = Field(
        ..., description='item ids of the original data, oldest first, or [item, "behaviour"] pairs', examples=[[1, 50, 181]]
    )
    timestamps: list[int] | None = Field(None, description="unix seconds, one per item, non-decreasing")
    behaviors: list[str] | None = Field(None, description="one behaviour per item (models trained with model.use_behavior)")
    k: int = Field(10, description="number of recommendations (1..catalogue size)")
    exclude_seen: bool | None = Field(
        None, description="leave the history's items out of the results (default: as the run's evaluation, eval.history)"
    )
    unknown_items: Literal["report", "ignore", "reject"] | None = Field(
        None, description="what to do with ids not in the catalogue (default: the server's --unknown-items)"
    )
    now: int | None = Field(None, description="unix time of the next interaction (default: the last timestamp)")

    def query(self) -> Query:
        return Query(self.history, self.timestamps, self.k, self.exclude_seen, self.unknown_items, self.now, self.behaviors)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[RecommendRequest] = Field(..., description="up to max_batch_request queries")
    errors: Literal["fail", "report"] = Field(
        "fail",
        description="a query that cannot be answered (an empty history, a bad k, unknown items under reject, ...): fail the whole "
        "batch with a 422 naming it (default), or report it in its own result (`error`, no items) and answer the others; a "
        "query that is not a request (an unknown field, a wrong type) fails the batch either way",
    )


class Item(BaseModel):
    item: int | str
    score: float
    title: str | None = None


class RecommendResponse(BaseModel):
    items: list[Item]
    error: str | None = None  # /recommend/batch with errors="report": why this query has no items
    unknown_items: list[int | str] | None = None
    truncated: int | None = None
    notes: list[str] | None = None


class BatchResponse(BaseModel):
    results: list[RecommendResponse]


class MicroBatcher:
    """Collects prepared queries from concurrent requests and scores them together."""

    def __init__(self, rec: Recommender, max_batch: int = 64, max_wait_ms: float = 2.0):
        self.rec, self.max_batch, self.max_wait = rec, max_batch, max_wait_ms / 1000.0
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.queries = 0

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def submit(self, preps: list[Prepared]) -> list[dict[str, Any]]:
        if self.queue is None:  # no lifespan (plain TestClient use): score directly
            return await asyncio.to_thread(self.rec.score, preps)
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((preps, fut))
        return await fut

    async def _run(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            group = [first]
            n = len(first[0])
            deadline = loop.time() + self.max_wait
            while n < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                group.append(nxt)
                n += len(nxt[0])
            preps = [p for g, _ in group for p in g]
            try:
                results = await asyncio.to_thread(self.rec.score, preps)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.queries += len(preps)
            i = 0
            for g, fut in group:
                if not fut.done():
                    fut.set_result(results[i : i + len(g)])
                i += len(g)


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413 (checked on the
    Content-Length header, and while streaming for chunked bodies)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(
                send,
                413,
                {
                    "error": f"request body of {int(length):,} bytes is over the limit of {self.limit:,} bytes; "
                    "send fewer or shorter histories (or raise --max-body-kb)"
                },
            )
        seen = 0
        too_big = False
        replaced = False

        async def limited():
            nonlocal seen, too_big
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    too_big = True
                    raise _TooBig()
            return msg

        async def guarded_send(msg):
            # the app may turn the aborted read into its own error response: answer 413 instead
            nonlocal replaced
            if too_big:
                if not replaced:
                    replaced = True
                    await _send_json(send, 413, {"error": f"request body is over the limit of {self.limit:,} bytes; send fewer or shorter histories"})
                return
            await send(msg)

        try:
            await self.app(scope, limited, guarded_send)
        except _TooBig:
            if not replaced:
                await _send_json(send, 413, {"error": f"request body is over the limit of {self.limit:,} bytes"})


class _TooBig(Exception):
    pass


async def _send_json(send, status: int, obj: dict) -> None:
    body = json.dumps(obj).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        e = next(e for e in errs if e.get("type") == "json_invalid")
        return 400, f'malformed JSON: {e.get("ctx", {}).get("error", e.get("msg"))}; send a JSON object such as {{"history": [1, 2, 3], "k": 10}}'
    parts = []
    for e in errs[:5]:
        loc = ".".join(str(x) for x in e.get("loc", []) if x != "body")
        if e.get("type") == "extra_forbidden":
            known = ", ".join(RecommendRequest.model_fields)
            parts.append(f"{loc}: unknown field (a request has {known}; a batch has {', '.join(BatchRequest.model_fields)})")
        else:
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return 422, "invalid request: " + "; ".join(parts)


def create_app(rec: Recommender, max_batch: int = 64, max_wait_ms: float = 2.0, max_body_bytes: int = 1 << 20, max_batch_request: int = 1024):
    from contextlib import asynccontextmanager

    from .demo_page import DEMO_HTML

    batcher = MicroBatcher(rec, max_batch, max_wait_ms)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="fuxi-mme", description="Next-item recommendations from a trained fuxi-mme run.", version="1", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.recommender = rec
    _add_error_handlers(app)
    _add_info_routes(app, rec, batcher)
    _add_recommend_routes(app, rec, batcher, max_batch_request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo() -> str:
        return DEMO_HTML

    return BodyLimit(app, max_body_bytes) if max_body_bytes else app


def _add_error_handlers(app: FastAPI) -> None:
    """Invalid requests answer ``{"error": message}`` with their status, never a traceback."""

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        status, msg = _validation_message(exc)
        return JSONResponse({"error": msg}, status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)


def _add_info_routes(app: FastAPI, rec: Recommender, batcher: MicroBatcher) -> None:
    """``/health``, ``/model`` (the run and the batcher's counts) and ``/items`` (title search)."""

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/model")
    async def model_info() -> dict:
        return {**rec.info(), "micro_batches": batcher.batches, "queries_served": batcher.queries}

    @app.get("/items")
    async def items(q: str = QueryParam("", max_length=200), limit: int = QueryParam(20, ge=1, le=200)) -> list[dict]:
        return rec.search(q, limit)


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed JSON"},
    413: {"description": "body too large"},
    422: {"description": "invalid request"},
}


def _add_recommend_routes(app: FastAPI, rec: Recommender, batcher: MicroBatcher, max_batch_request: int) -> None:
    """``/recommend`` (one query) and ``/recommend/batch`` (up to ``max_batch_request``), both
    scored through the micro-batcher."""

    @app.post("/recommend", response_model=RecommendResponse, response_model_exclude_none=True, responses=_ERRORS)
    async def recommend(req: RecommendRequest):
        prep = rec.prepare(req.query())
        return (await batcher.submit([prep]))[0]

    @app.post("/recommend/batch", response_model=BatchResponse, response_model_exclude_none=True, responses=_ERRORS)
    async def recommend_batch(req: BatchRequest):
        if not req.requests:
            raise RequestError("requests is empty: give at least one query")
        if len(req.requests) > max_batch_request:
            raise RequestError(f"{len(req.requests)} queries in one batch is over the limit of {max_batch_request}; split it", 413)
        preps, failed = [], {}
        for i, r in enumerate(req.requests):
            try:
                preps.append(rec.prepare(r.query()))
            except RequestError as exc:
                if req.errors == "fail":
                    raise RequestError(f"requests[{i}]: {exc}", exc.status) from exc
                failed[i] = str(exc)
        answers = iter(await batcher.submit(preps) if preps else [])
        return {"results": [{"items": [], "error": failed[i]} if i in failed else next(answers) for i in range(len(req.requests))]}


def serve(
    run_dir: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    checkpoint: str = "auto",
    device: str = "cpu",
    unknown_items: str = "report",
    max_batch: int = 64,
    max_wait_ms: float = 2.0,
    max_body_bytes: int = 1 << 20,
    exported: str | None = None,
    runtime: str = "program",
) -> None:
    """Serve a run (``run_dir``, the eager model) or an export folder (``exported``, on the CPU,
    with the ``torch.export`` program or, ``runtime="aoti"``, the AOTInductor package)."""
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError("the HTTP service needs uvicorn: pip install 'fuxi-mme[serve]'") from exc
    if exported:
        from .export import load_exported

        rec = load_exported(exported, runtime, unknown_items)
    else:
        assert run_dir is not None, "serve needs a run folder or an export folder"
        rec = Recommender.from_run(run_dir, checkpoint, device, unknown_items)
    app = create_app(rec, max_batch, max_wait_ms, max_body_bytes)
    log.info("serving %s (%s on %s, %d items) on http://%s:%d", exported or run_dir, rec.cfg.model.name, rec.ds.name, rec.num_items, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
