"""The HTTP front door: ``POST /assets`` looks synchronous to its caller and is a command inside.

The seeds' worked example, served with FastAPI. A request becomes a ``RegisterAsset`` command on
the bus; the endpoint waits a short while (``POSTROOM_API_REPLY_WAIT``) for the reply, the way a
caller of a synchronous API expects, and when the owner is slower than that it answers 202 with
where to fetch the reply later, instead of holding the connection open or losing the outcome:

    POST /assets ─> bus.send(RegisterAsset) ─> ( commands.assets ) ─> pool "assets"
         │                                                               │
         ├─ reply in time:   201 Created,  Location: /assets/{asset_id}  │
         └─ no reply yet:    202 Accepted, Location: /commands/{cid} <───┘ result backend[cid]

``POST /orders`` is the same for seed 004's ``PlaceOrder``: 201 once the order is placed, its
payment and fulfilment going on behind it (``GET /orders/{order_id}`` follows its status).

A ``Postroom-Callback-Url`` header on either POST (a URL on POSTROOM_CALLBACK_ALLOW, else 422) has
the reply POSTed there, signed, once it is in (postroom.webhooks), whatever the answer.

Reads are queries through the bus as well (``GetAsset``, ``SearchAssets``, ``GetOrder``): this
process holds no state and imports contracts only, never a handler. Endpoints are plain ``def`` functions, so the
blocking waits on the bus run in Starlette's thread pool, not on the event loop.
"""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from typing import Annotated, Any

import redis.exceptions
import uvicorn
from celery.result import AsyncResult
from fastapi import FastAPI, HTTPException, Request, status
from fastapi import Query as QueryParam
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel

from postroom import CallbackRefused, MessageBus, ReplyTimeout, SendFailed, tracing, webhooks
from postroom.messages import Command, Query, Reply
from postroom.settings import Settings
from tasks.assets import GetAsset, RegisterAsset
from tasks.orders import GetOrder, PlaceOrder
from tasks.search import SearchAssets
from workers.api_models import (
    Asset,
    AssetCreated,
    AssetMatch,
    CallbackUrl,
    CommandAccepted,
    IdempotencyKey,
    NewAsset,
    NewOrder,
    Order,
    OrderPlaced,
)
from workers.deployment import add_server_arguments, load_or_exit, overridden

logger = logging.getLogger(__name__)

#: Idempotency keys become message IDs as uuid5 over this namespace. It never changes: a new
#: namespace would turn every key a client is retrying with into a new command.
IDEMPOTENCY_KEYS = uuid.UUID("0f3c8e9e-5b7a-4f7e-8a51-6c2d9b4e1a70")

#: A rejection with this error means the owner refused the payload itself: 422, not 409.
_INVALID_PAYLOAD = "InvalidMessage"


#: what a POST that sends a command may answer besides its 201
COMMAND_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": CommandAccepted, "description": "no reply yet: poll the Location"},
    422: {"description": "an invalid field, or a callback URL that is not allowed"},
    409: {"model": Reply, "description": "the service rejected the command"},
    502: {"model": Reply, "description": "the command failed (its error names the type)"},
}


def message_id_for(idempotency_key: str, command: type[Command]) -> str:
    """The message ID a request with this ``Idempotency-Key`` is sent under.

    The same key always gives the same ID, so a retried request is the same message: the owner's
    inbox runs it once and its reply is stored under that ID (the correlation ID defaults to it).
    The command's type is part of the name, so one key used on two endpoints makes two commands.
    """
    return str(uuid.uuid5(IDEMPOTENCY_KEYS, f"{command.__message_type__}\n{idempotency_key}"))


def accepted(correlation_id: str) -> JSONResponse:
    """202 Accepted: where the reply of a command still on its way can be fetched."""
    location = f"/commands/{correlation_id}"
    body = CommandAccepted(correlation_id=correlation_id, location=location)
    return JSONResponse(
        body.model_dump(),
        status_code=status.HTTP_202_ACCEPTED,
        headers={"Location": location, "Retry-After": "1", "X-Correlation-ID": correlation_id},
    )


def unsuccessful(reply: Reply) -> JSONResponse:
    """The HTTP answer to a rejected or failed reply; the body is the reply itself.

    Rejected: 409 Conflict (the owner refused the command; sending it again changes nothing), or
    422 when it was the payload that was refused. Failed: 502 Bad Gateway, since the service
    behind this API broke or kept failing past its retries; the error names its type.
    """
    if reply.status == "rejected":
        invalid = reply.error is not None and reply.error.type == _INVALID_PAYLOAD
        # 422 as a literal: Starlette renamed its constant (UNPROCESSABLE_ENTITY -> _CONTENT)
        code = 422 if invalid else status.HTTP_409_CONFLICT
    else:
        code = status.HTTP_502_BAD_GATEWAY
    return JSONResponse(
        reply.model_dump(mode="json"),
        status_code=code,
        headers={"X-Correlation-ID": reply.correlation_id},
    )


def send_command(
    bus: MessageBus,
    config: Settings,
    command: Command,
    idempotency_key: str | None,
    callback_url: str | None,
) -> Reply | JSONResponse:
    """What a POST does with its command: its reply, if it succeeded in time; else the answer
    to give (202 to poll, 409/422/502 for a rejection or failure, 422 for a callback URL off
    the allow-list). A repeat with an Idempotency-Key whose reply is stored sends nothing."""
    if callback_url is not None:
        try:
            webhooks.allowed(callback_url, config)
        except CallbackRefused as refused:
            return JSONResponse({"detail": str(refused)}, status_code=422)
    message_id = None
    reply = None
    if idempotency_key is not None:
        message_id = message_id_for(idempotency_key, type(command))
        reply = _stored_reply(bus, message_id)
    if reply is None:
        pending = bus.send(command, message_id=message_id, callback_url=callback_url)
        if config.api_reply_wait <= 0:  # 202 at once, as documented: not a race with the worker
            return accepted(pending.correlation_id)
        try:
            reply = pending.reply(timeout=config.api_reply_wait)
        except ReplyTimeout:
            return accepted(pending.correlation_id)
    return reply if reply.ok else unsuccessful(reply)


def created(body: BaseModel, location: str, reply: Reply) -> JSONResponse:
    """201 Created: the reply's value, and where the new thing is."""
    return JSONResponse(
        body.model_dump(mode="json"),
        status_code=status.HTTP_201_CREATED,
        headers={"Location": location, "X-Correlation-ID": reply.correlation_id},
    )


def _stored_reply(bus: MessageBus, correlation_id: str) -> Reply | None:
    """The reply already stored under a correlation ID, or None; never waits for one to arrive.

    A result that is not ready (unknown, queued, running or between retries) is None: the result
    backend cannot tell a command it never saw from one still in a queue.
    """
    if not AsyncResult(correlation_id, app=bus.app).ready():
        return None
    return bus.reply_for(correlation_id, timeout=5.0)  # stored: this returns at once


def _ask(bus: MessageBus, query: Query, timeout: float) -> Reply:
    """The query's reply; 504 when none comes in time, as a proxy does for a silent upstream."""
    try:
        return bus.ask(query, timeout=timeout)
    except ReplyTimeout:
        raise HTTPException(
            status.HTTP_504_GATEWAY_TIMEOUT,
            f"the {query.__message_type__} query got no reply within {timeout}s: is the pool "
            f"serving commands.{query.__service__} running? (postroom up)",
        ) from None


def _broker_unreachable(request: Request, exc: Exception) -> JSONResponse:
    """503 rather than a bare 500: the request was fine, the post room behind it is not there.

    The error's own text stays in the log (it can name hosts); the client is told what to do.
    """
    logger.error(
        "%s %s: broker or result backend unreachable: %r", request.method, request.url, exc
    )
    return JSONResponse(
        {
            "detail": f"the broker or the result backend is unreachable ({type(exc).__name__}). "
            "A command may or may not have been sent: retry with the same Idempotency-Key"
        },
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
    )


def create_api(bus: MessageBus, config: Settings) -> FastAPI:
    """The FastAPI app of the front door, sending through ``bus`` with the waits of ``config``."""
    api = FastAPI(
        title="postroom",
        version="0.1.0",
        summary="Commands and queries on the bus, behind plain HTTP.",
        description=(
            "`POST /assets` sends the `RegisterAsset` command (`POST /orders`: `PlaceOrder`) and "
            f"waits up to {config.api_reply_wait}s for its reply: 201 with the new resource's "
            "Location if it comes, 202 with a `/commands/{correlation_id}` Location to poll if it "
            "does not. Send an "
            "`Idempotency-Key` header to make a retried POST the same command, and a "
            "`Postroom-Callback-Url` header to have the reply POSTed there, signed."
        ),
    )

    @api.middleware("http")
    async def traced(request: Request, call_next: Any) -> Any:
        """Each request is a span, parent of the spans of the commands and queries it sends."""
        with tracing.serving(request.method, dict(request.headers)) as span:
            response = await call_next(request)
            route = request.scope.get("route")
            span.update_name(f"{request.method} {getattr(route, 'path', request.url.path)}")
            span.set_attribute("http.response.status_code", response.status_code)
            return response

    api.add_exception_handler(SendFailed, _broker_unreachable)
    api.add_exception_handler(OperationalError, _broker_unreachable)
    api.add_exception_handler(redis.exceptions.ConnectionError, _broker_unreachable)

    @api.post(
        "/assets",
        status_code=status.HTTP_201_CREATED,
        response_model=AssetCreated,
        responses=COMMAND_RESPONSES,
    )
    def register_asset(
        body: NewAsset,
        idempotency_key: IdempotencyKey = None,
        postroom_callback_url: CallbackUrl = None,
    ) -> JSONResponse:
        """Register an asset: the RegisterAsset command, waited for briefly."""
        command = RegisterAsset(**body.model_dump())
        reply = send_command(bus, config, command, idempotency_key, postroom_callback_url)
        if isinstance(reply, JSONResponse):
            return reply
        asset = AssetCreated.model_validate(reply.value)
        return created(asset, f"/assets/{asset.asset_id}", reply)

    @api.post(
        "/orders",
        status_code=status.HTTP_201_CREATED,
        response_model=OrderPlaced,
        responses=COMMAND_RESPONSES,
    )
    def place_order(
        body: NewOrder,
        idempotency_key: IdempotencyKey = None,
        postroom_callback_url: CallbackUrl = None,
    ) -> JSONResponse:
        """Place an order: the PlaceOrder command, waited for briefly. Its payment and its
        fulfilment (the vendor's confirmation, or a refund) go on after the 201."""
        command = PlaceOrder(**body.model_dump())
        reply = send_command(bus, config, command, idempotency_key, postroom_callback_url)
        if isinstance(reply, JSONResponse):
            return reply
        order = OrderPlaced.model_validate(reply.value)
        return created(order, f"/orders/{order.order_id}", reply)

    @api.get(
        "/commands/{correlation_id}",
        response_model=Reply,
        responses={202: {"model": CommandAccepted, "description": "no reply yet"}},
    )
    def command_reply(correlation_id: uuid.UUID) -> Reply | JSONResponse:
        """The reply of a command, or 202 pending while there is none.

        An unknown correlation ID is pending too: a command still in its queue has left no trace
        in the result backend yet, so the two cannot be told apart. A reply is kept for
        POSTROOM_REPLY_TTL seconds; after that its command reads as pending for ever.
        """
        reply = _stored_reply(bus, str(correlation_id))
        return accepted(str(correlation_id)) if reply is None else reply

    @api.get(
        "/assets/{asset_id}",
        response_model=Asset,
        responses={404: {"description": "no such asset"}, 504: {"description": "no reply"}},
    )
    def get_asset(asset_id: uuid.UUID) -> Any:
        """One asset, by the GetAsset query to the assets service."""
        reply = _ask(bus, GetAsset(asset_id=asset_id), config.api_query_timeout)
        if reply.status == "rejected":  # GetAsset refuses exactly one way: no such asset
            reason = reply.error.message if reply.error else f"asset {asset_id} does not exist"
            raise HTTPException(status.HTTP_404_NOT_FOUND, reason)
        if not reply.ok:
            return unsuccessful(reply)
        return reply.value

    @api.get(
        "/orders/{order_id}",
        response_model=Order,
        responses={404: {"description": "no such order"}, 504: {"description": "no reply"}},
    )
    def get_order(order_id: uuid.UUID) -> Any:
        """One order, by the GetOrder query to the orders service: placed, paid, declined,
        completed, or cancelled (with the reason)."""
        reply = _ask(bus, GetOrder(order_id=order_id), config.api_query_timeout)
        if reply.status == "rejected":  # GetOrder refuses exactly one way: no such order
            reason = reply.error.message if reply.error else f"order {order_id} does not exist"
            raise HTTPException(status.HTTP_404_NOT_FOUND, reason)
        if not reply.ok:
            return unsuccessful(reply)
        return reply.value

    @api.get(
        "/assets",
        response_model=list[AssetMatch],
        responses={504: {"description": "no reply"}},
    )
    def search_assets(
        name: Annotated[
            str,
            QueryParam(
                min_length=1,
                max_length=200,
                description="words the name must contain (whole words, any case)",
            ),
        ],
    ) -> Any:
        """Assets whose name contains every word of ``name``, from the search pool's index.

        The index is fed by AssetRegistered events, so an asset appears here a moment after its
        POST answered 201, not necessarily at once.
        """
        reply = _ask(bus, SearchAssets(text=name), config.api_query_timeout)
        if not reply.ok:
            return unsuccessful(reply)
        return reply.value

    return api


def main(argv: list[str] | None = None) -> int:
    """``postroom api``: serve the front door on --host:--port (POSTROOM_API_HOST, _PORT)."""
    parser = argparse.ArgumentParser(prog="postroom api", description=__doc__)
    add_server_arguments(parser, "POSTROOM_API_HOST", "POSTROOM_API_PORT")
    args = parser.parse_args(argv)
    deployment = load_or_exit(args.app)
    settings = overridden(deployment.settings, api_host=args.host, api_port=args.port)
    api = create_api(MessageBus(deployment.app, source="api"), settings)
    uvicorn.run(
        api, host=settings.api_host, port=settings.api_port, log_level=settings.log_level.lower()
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
