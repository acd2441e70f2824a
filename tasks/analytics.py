"""Pool 'analytics': counts registrations and bindings, and answers GetAssetStats."""

from __future__ import annotations

from postroom import HandlerContext, Query, handles, subscribes
from tasks.assets import AssetRegistered, DeviceBound
from tasks.state import client, key

POOL = "analytics"


class GetAssetStats(Query):
    pass


@subscribes(AssetRegistered, pool=POOL)
def count_registration(event: AssetRegistered, ctx: HandlerContext) -> None:
    ctx.transaction().hincrby(key(POOL, "counts"), "assets_registered", 1)  # once per event


@subscribes(DeviceBound, pool=POOL)
def count_binding(event: DeviceBound, ctx: HandlerContext) -> None:
    ctx.transaction().hincrby(key(POOL, "counts"), "devices_bound", 1)


@handles(GetAssetStats, service=POOL)
def asset_stats(query: GetAssetStats, ctx: HandlerContext) -> dict[str, int]:
    counts = client().hgetall(key(POOL, "counts"))
    return {name: int(counts.get(name, 0)) for name in ("assets_registered", "devices_bound")}
