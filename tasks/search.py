"""Pool 'search': keeps a word index of asset names, and answers SearchAssets from it."""

from __future__ import annotations

import re

from postroom import HandlerContext, Query, handles, subscribes
from tasks.assets import AssetRegistered
from tasks.state import client, key

POOL = "search"


class SearchAssets(Query):
    """Assets whose name contains every word of ``text`` (case-insensitive, whole words)."""

    text: str


def _words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"\w+", text)}


@subscribes(AssetRegistered, pool=POOL)
def index_asset(event: AssetRegistered, ctx: HandlerContext) -> None:
    tx = ctx.transaction()
    tx.hset(key(POOL, "names"), str(event.asset_id), event.name)
    for word in _words(event.name):
        tx.sadd(key(POOL, "word", word), str(event.asset_id))


@handles(SearchAssets, service=POOL)
def search_assets(query: SearchAssets, ctx: HandlerContext) -> list[dict[str, str]]:
    words = _words(query.text)
    if not words:
        return []
    db = client()
    ids = sorted(db.sinter([key(POOL, "word", w) for w in words]))
    names = db.hmget(key(POOL, "names"), ids) if ids else []
    return [{"asset_id": i, "name": n} for i, n in zip(ids, names, strict=True)]
