"""The HTTP front door's bodies and headers (workers/api.py): its public schema, declared apart
from the contracts so the API can evolve apart from the messages (tests keep them in step)."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import Header
from pydantic import BaseModel, ConfigDict, Field


class NewAsset(BaseModel):
    """The body of ``POST /assets``: ``RegisterAsset``'s fields, so a bad body is refused with 422
    naming the field before anything is sent. The HTTP schema is declared here rather than being the
    contract itself, so the public API can evolve apart from the message (a test keeps them in step).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, examples=["Truck 12"])
    description: str | None = Field(default=None, examples=["Refrigerated, 12 t"])
    attributes: dict[str, str] = Field(default_factory=dict, examples=[{"fleet": "north"}])


class AssetCreated(BaseModel):
    """201: the reply's value; the asset itself is at the Location."""

    asset_id: uuid.UUID


class CommandAccepted(BaseModel):
    """202: the command is queued or running; its reply will be at ``location``."""

    status: Literal["pending"] = "pending"
    correlation_id: str
    location: str


class Asset(BaseModel):
    """An asset as the assets service answers ``GetAsset``."""

    asset_id: uuid.UUID
    name: str
    description: str | None = None
    attributes: dict[str, str] = Field(default_factory=dict)
    registered_at: str
    devices: list[str] = Field(default_factory=list)


class AssetMatch(BaseModel):
    """One hit of ``SearchAssets`` (the search pool's index, fed by ``AssetRegistered`` events)."""

    asset_id: uuid.UUID
    name: str


class NewOrder(BaseModel):
    """The body of ``POST /orders``: ``PlaceOrder``'s fields (a test keeps them in step)."""

    model_config = ConfigDict(extra="forbid")

    customer: str = Field(min_length=1, max_length=200, examples=["ada"])
    vendor: str = Field(min_length=1, max_length=100, examples=["greengrocer"])
    amount_cents: int = Field(gt=0, examples=[1250])
    confirm_within: float = Field(
        default=30.0,
        gt=0,
        le=86400,
        description="seconds the vendor has to confirm, once the order is paid, before it is "
        "cancelled and refunded",
    )


class OrderPlaced(BaseModel):
    """201: the order is placed; its payment and fulfilment go on (follow them at Location)."""

    order_id: uuid.UUID
    status: str


class Order(BaseModel):
    """An order as the orders service answers ``GetOrder``."""

    order_id: uuid.UUID
    customer: str
    vendor: str
    amount_cents: int
    confirm_within: float
    status: Literal["placed", "paid", "declined", "completed", "cancelled"]
    payment_id: uuid.UUID | None = None
    reason: str | None = None
    placed_at: str
    updated_at: str


IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=255,
        description="a client-chosen key; the same key and body give the same result however "
        "often they are sent (the body of a repeat is not compared)",
    ),
]
CallbackUrl = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=2000,
        description="a URL the reply is POSTed to, signed, once it is in, whatever this response "
        "was; it must start with one of POSTROOM_CALLBACK_ALLOW (422 otherwise). A repeat with an "
        "Idempotency-Key whose reply is stored sends nothing again",
    ),
]
