"""ONE handling pipeline for commands, queries and event deliveries: an ordered list of steps.

A Celery worker (postroom._celery) and the in-memory harness (postroom.testing) run the same
steps, so what a handler test proves about dedupe, retries and commits holds on a real broker.
Add your own step with ``postroom.install(app, settings, steps=[...])``: your steps run around
the handler call, inside Breaker, Throttle, Retry, Commit and Webhook, outermost first (see the README, "The
handling pipeline").
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from postroom.pipeline.breaker import Breaker
from postroom.pipeline.callback import Callback
from postroom.pipeline.context import HandlerContext
from postroom.pipeline.delivery import Delivery, Kind, Outcome, Runtime, kind_of
from postroom.pipeline.parking import Park
from postroom.pipeline.ratelimit import Throttle
from postroom.pipeline.steps import (
    Commit,
    DeadLetter,
    Decode,
    Dedupe,
    GiveUp,
    Log,
    Next,
    PoisonGuard,
    PoisonMessage,
    Retry,
    Run,
    Step,
    Trace,
    Upcast,
    Validate,
    VerifySignature,
)
from postroom.pipeline.webhook import Webhook

__all__ = [
    "Breaker",
    "Callback",
    "DeadLetter",
    "Delivery",
    "GiveUp",
    "HandlerContext",
    "Kind",
    "Next",
    "Outcome",
    "Park",
    "Pipeline",
    "PoisonMessage",
    "Runtime",
    "Step",
    "Throttle",
    "Webhook",
    "default_steps",
    "kind_of",
]


def default_steps(extra: Sequence[Step] = ()) -> list[Step]:
    """postroom's steps in order, with ``extra`` placed around the handler call."""
    return [
        Trace(),
        Log(),
        Callback(),
        DeadLetter(),
        Decode(),
        VerifySignature(),
        Upcast(),
        Validate(),
        Park(),
        Dedupe(),
        PoisonGuard(),
        Breaker(),
        Throttle(),
        Retry(),
        Commit(),
        Webhook(),
        *extra,
        Run(),
    ]


def _end(delivery: Delivery) -> Outcome:
    raise RuntimeError("the pipeline's last step must not call call_next: end it with Run()")


class Pipeline:
    """The steps chained once, so a message costs one call per step and nothing else."""

    def __init__(self, steps: Sequence[Step]) -> None:
        self.steps = tuple(steps)
        chain: Next = _end
        for step in reversed(self.steps):
            chain = partial(step, call_next=chain)
        self._chain = chain

    def __call__(self, delivery: Delivery) -> Outcome:
        return self._chain(delivery)

    def __repr__(self) -> str:
        return f"Pipeline({' -> '.join(type(s).__name__ for s in self.steps)})"
