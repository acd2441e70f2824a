"""Dead letters that keep order: the later messages of a dead-lettered key wait behind it.

A partitioned command handled strictly in send order per key value (postroom.partitions) must not
be overtaken by the messages sent after it just because it failed for good. So when one is
dead-lettered, its key's **line** starts: the letter is the line's head, and each later message of
that key (same owner, same key value) is not run but kept as a dead letter too, reason ``parked``,
and acknowledged. Other keys of the same partition queue keep flowing.

```
 commands.ordered.p2:  a1#7  b4#3  a1#8  c9#1  a1#9 ...
                        │     │     │     │     │
                        ✗     ✓     ⏸     ✓     ⏸        line of a1:  [a1#7 failed] ← a1#8 ← a1#9
```

``postroom dlq redrive <head>`` (or ``--all``) sends the head back with its message ID; once it
has run, the worker sends the next message of the line, and so on: one at a time, so a redriven
message can never overtake another, whatever else of that key still sits in the queue. While the
line drains, the key stays parked: only the message at the head runs; anything else of that key
that arrives meanwhile (a message sent late, or one still queued when the redrive began) joins
the line's tail and runs in its turn. The key flows again when the line is empty. If a redriven
message fails again it is the line's head again, and the key stays parked behind it.

Every change of a line is one Lua script (with the letter it stores or drops), so a worker killed
at any instant leaves a line that is consistent; the one gap between two steps is covered by the
inbox: the next message is sent *before* the head leaves the line, so a crash in between runs the
head again (its inbox answers with what it recorded) and sends the next one again (a copy that
arrives when it is no longer the head is parked, and deduplicated when its turn comes).

Cost: a partitioned command costs one GET more (is its key parked?); other messages nothing.

Redis layout, per owner and key value (``<ns>:parked:<owner>:<key>``): the string itself (absent:
the key flows; ``""``: blocked behind a dead head; a message ID: that message, the head, is being
redriven), ``…:line`` (the message IDs in order) and ``…:letters`` (message ID -> letter ID).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import redis

from postroom.errors import NoSuchLetter, OutOfLine
from postroom.headers import MESSAGE_ID

if TYPE_CHECKING:
    from postroom.reliability import DeadLetter
    from postroom.stores import DeadLetterStore

#: what a parked key's line does with a message of that key: run it (the key flows, or it is the
#: head being redriven), or keep it in the line
Admission = Literal["free", "next", "parked"]

# KEYS: state, line, letters, index, letter record. ARGV: message ID, letter ID, letter JSON, at
_PARK = """
local state = redis.call('GET', KEYS[1])
if not state then return 'free' end
if state == ARGV[1] then return 'next' end
if redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('SET', KEYS[5], ARGV[3])
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[2])
end
return 'parked'
"""

# the same keys and ARGV, and the letters' prefix: the message ran before all those in the line
_HEAD = """
redis.call('SET', KEYS[5], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[2])
local old = redis.call('HGET', KEYS[3], ARGV[1])
if old then
  redis.call('DEL', ARGV[5] .. old)
  redis.call('ZREM', KEYS[4], old)
  redis.call('LREM', KEYS[2], 1, ARGV[1])
end
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('SET', KEYS[1], '')
return 1
"""

# KEYS: state, line. ARGV: the message ID of the letter to redrive
_START = """
local state = redis.call('GET', KEYS[1])
if not state then return 'gone' end
if redis.call('LINDEX', KEYS[2], 0) ~= ARGV[1] then return 'behind' end
if state == ARGV[1] then return 'again' end
redis.call('SET', KEYS[1], ARGV[1])
return 'started'
"""

# KEYS: state, line, letters. ARGV: the head's message ID. The letter ID of the message after it
_FOLLOWING = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
local after = redis.call('LINDEX', KEYS[2], 1)
if not after then return false end
return redis.call('HGET', KEYS[3], after)
"""

# KEYS: state, line, letters, index. ARGV: the head's message ID, the letters' prefix, and
# whether it must be the head being redriven ('1': it has run) or blocked ('0': purged)
_DROP = """
local state = redis.call('GET', KEYS[1])
if not state then return 'gone' end
if redis.call('LINDEX', KEYS[2], 0) ~= ARGV[1] then return 'behind' end
if ARGV[3] == '1' and state ~= ARGV[1] then return 'gone' end
if ARGV[3] == '0' and state ~= '' then return 'redriving' end
redis.call('LPOP', KEYS[2])
local letter = redis.call('HGET', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if letter then
  redis.call('DEL', ARGV[2] .. letter)
  redis.call('ZREM', KEYS[4], letter)
end
local after = redis.call('LINDEX', KEYS[2], 0)
if not after then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
elseif ARGV[3] == '1' then
  redis.call('SET', KEYS[1], after)
end
return 'dropped'
"""


@dataclass(frozen=True)
class Line:
    """A parked key's line: its letters in order, the head first, and whether it is draining."""

    letter_ids: list[str]
    redriving: bool

    @property
    def head(self) -> str:
        return self.letter_ids[0]


def message_id_of(letter: DeadLetter) -> str:
    """The message ID a line knows a letter by (every partitioned letter has one)."""
    return str(letter.headers[MESSAGE_ID])


class RedisLines:
    """The lines of parked keys, kept with the dead letters in the state Redis."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self._namespace = namespace
        self._index = f"{namespace}:dlq"
        self._prefix = f"{namespace}:dlq:letter:"
        self._park = client.register_script(_PARK)
        self._head = client.register_script(_HEAD)
        self._start = client.register_script(_START)
        self._following = client.register_script(_FOLLOWING)
        self._drop = client.register_script(_DROP)

    def _keys(self, owner: str, key: str) -> list[str]:
        state = f"{self._namespace}:parked:{owner}:{key}"
        return [state, f"{state}:line", f"{state}:letters"]

    def _letter_args(self, letter: DeadLetter) -> tuple[list[str], list[str | float]]:
        assert letter.partition is not None
        keys = [*self._keys(letter.owner, letter.partition), self._index, self._prefix + letter.id]
        body = json.dumps(asdict(letter), default=str)
        return keys, [message_id_of(letter), letter.id, body, letter.at]

    def waiting(self, owner: str, key: str) -> str | None:
        """None: the key flows; "": it waits behind a dead head; else the ID of the message
        being redriven at its head. The one lookup a partitioned command costs."""
        found = self.client.get(self._keys(owner, key)[0])
        return None if found is None else str(found)

    def park(self, letter: DeadLetter) -> Admission:
        """Keep ``letter`` at the tail of its key's line, unless the key flows again or the
        message is the head being redriven (checked in the same step, as a redrive or purge
        may have changed the line since ``waiting``)."""
        keys, args = self._letter_args(letter)
        return str(self._park(keys=keys, args=args))  # type: ignore[return-value]

    def head(self, letter: DeadLetter) -> str:
        """Keep the letter of a partitioned message that failed for good at the head of its
        key's line (the line starts, or its redriven head failed again): the key waits."""
        keys, args = self._letter_args(letter)
        self._head(keys=keys, args=[*args, self._prefix])
        return letter.id

    def line(self, owner: str, key: str) -> Line | None:
        state_key, line_key, letters_key = self._keys(owner, key)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.get(state_key)
            pipe.lrange(line_key, 0, -1)
            pipe.hgetall(letters_key)
            state, order, letters = pipe.execute()
        if state is None or not order:
            return None
        return Line([str(letters[m]) for m in order if m in letters], redriving=state != "")

    def start(self, owner: str, key: str, message_id: str) -> str:
        """Begin draining the line headed by ``message_id``: started, again (it was started
        already), behind (not the head) or gone (no such line)."""
        return str(self._start(keys=self._keys(owner, key)[:2], args=[message_id]))

    def following(self, owner: str, key: str, message_id: str) -> str | None:
        """The letter after ``message_id`` in its line, if it is the head being redriven."""
        found = self._following(keys=self._keys(owner, key), args=[message_id])
        return None if found is None else str(found)

    def advance(self, owner: str, key: str, message_id: str) -> None:
        """The head being redriven has run: it leaves the line, the next one is the head."""
        self._drop(keys=[*self._keys(owner, key), self._index], args=[message_id, self._prefix, 1])

    def drop_head(self, owner: str, key: str, message_id: str) -> str:
        """Purge a blocked line's head: dropped, behind, redriving or gone."""
        keys = [*self._keys(owner, key), self._index]
        return str(self._drop(keys=keys, args=[message_id, self._prefix, 0]))

    def unpark_all(self) -> None:
        for name in self.client.scan_iter(f"{self._namespace}:parked:*", count=1000):
            self.client.delete(name)


def _find(letters: DeadLetterStore, letter_id: str) -> tuple[DeadLetter, Line | None]:
    """The letter and the line it is in (None: it is in none).

    A line drains while a redrive or purge looks at it: a letter read just before its line ran
    it is gone once the line is read, and must not be sent again as a letter on its own.
    """
    letter = letters.get(letter_id)
    line = None
    if letter is not None and letter.partition is not None:
        line = letters.line(letter.owner, letter.partition)
        if line is None or letter_id not in line.letter_ids:
            letter, line = letters.get(letter_id), None
    if letter is None:
        raise NoSuchLetter(f"no dead letter {letter_id} (redriven or purged already?)")
    return letter, line


def redrive_one(
    letters: DeadLetterStore, send: Callable[[DeadLetter], None], letter_id: str
) -> str:
    """Send a dead letter back (``postroom dlq redrive ID``); what was done, in a sentence.

    A line's head drains its whole line, in order; a letter parked behind a head is refused
    (``OutOfLine``): run alone it would overtake its head.
    """
    letter, line = _find(letters, letter_id)
    if line is None or letter.partition is None:
        send(letter)
        letters.remove(letter_id)
        return f"redriven {letter_id} to {letter.queue}"
    started = letters.start(letter.owner, letter.partition, message_id_of(letter))
    if started == "gone":  # purged meanwhile, with its line
        raise NoSuchLetter(f"no dead letter {letter_id} (purged meanwhile)")
    if started == "behind":
        raise OutOfLine(
            f"{letter_id} is parked behind {line.head}, an earlier message of its key "
            f"({letter.partition}) that was dead-lettered: redrive {line.head}, which sends "
            "it and every message parked behind it, in order"
        )
    send(letter)
    again = " again (its line was being redriven already)" if started == "again" else ""
    return (
        f"redriven {letter_id} to {letter.queue}{again}; the {len(line.letter_ids) - 1} "
        "message(s) parked behind it follow it one by one, in order"
    )


def redrive_all(letters: DeadLetterStore, send: Callable[[DeadLetter], None]) -> list[str]:
    """Send every dead letter back (``--all``): a parked one goes with its line's head, and a
    line being redriven already is left to drain."""
    done = []
    for letter_id in letters.ids():
        try:
            _, line = _find(letters, letter_id)
            if line is None or (line.head == letter_id and not line.redriving):
                done.append(redrive_one(letters, send, letter_id))
        except NoSuchLetter:
            continue  # it ran with its line meanwhile
    return done


def purge_one(letters: DeadLetterStore, letter_id: str) -> str:
    """Delete one dead letter (``postroom dlq purge ID``); a line's head only while it is blocked
    (its parked messages stay parked, the first of them now the head), never a parked one."""
    letter, line = _find(letters, letter_id)
    if line is None or letter.partition is None:
        letters.remove(letter_id)
        return f"purged {letter_id}"
    dropped = letters.drop_head(letter.owner, letter.partition, message_id_of(letter))
    if dropped == "gone":  # its line ran it, or was purged, meanwhile
        raise NoSuchLetter(f"no dead letter {letter_id} (redriven or purged meanwhile)")
    if dropped == "behind":
        raise OutOfLine(
            f"{letter_id} is parked behind {line.head}: purging it alone would run the messages "
            f"after it before it; purge or redrive {line.head} first"
        )
    if dropped == "redriving":
        raise OutOfLine(f"{letter_id} heads a line being redriven: wait until it has run")
    behind = len(line.letter_ids) - 1
    if not behind:
        return f"purged {letter_id}; its key ({letter.partition}) flows again"
    return (
        f"purged {letter_id}; the {behind} message(s) parked behind it stay parked, "
        f"{line.letter_ids[1]} now at the head: redrive it to run them in order"
    )
