"""Which clients are connected to a served model, from the notes they leave.

A client says hello when it connects and goodbye when it disconnects. Both
notes travel in the channel's public ``notes`` queue. They carry a session id
of their own, not the id that names the client's share queues, so a note
says nothing about which queue belongs to whom. The server only learns how
many clients are connected, which is what its owner needs in order to stop
serving without cutting anyone off.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable, List, Tuple

_HELLO = "hello "
_BYE = "bye "


def hello(session: str) -> str:
    """The note a client leaves when it connects."""
    return _HELLO + session


def bye(session: str) -> str:
    """The note a client leaves when it disconnects."""
    return _BYE + session


def read_notes(notes: Iterable[str]) -> List[Tuple[str, str]]:
    """What the ``notes`` queue held, as ``[(kind, session)]``; ``kind`` is "hello" or "bye".

    Anything else is not a note of ours and is passed over: the queue is
    public, so any connected process can put a string there.
    """
    greetings = []
    for note in notes:
        if note.startswith(_HELLO):
            greetings.append(("hello", note[len(_HELLO):]))
        elif note.startswith(_BYE):
            greetings.append(("bye", note[len(_BYE):]))
    return greetings


@dataclass(frozen=True)
class Event:
    """A client came or went: ``connected`` now, and ``answered`` requests so far."""

    kind: str        # "hello" or "bye"
    connected: int
    answered: int


class Attendance:
    """The clients connected to one served model; safe to read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connected: set = set()
        self._left: set = set()  # a late hello of a client already gone is ignored
        self.events: List[Event] = []

    def record(self, greetings: Iterable[Tuple[str, str]], answered: int) -> None:
        """Take in the hello and bye notes read from the queue, in their order."""
        with self._lock:
            for kind, session in greetings:
                if kind == "hello" and session not in self._connected | self._left:
                    self._connected.add(session)
                elif kind == "bye" and session not in self._left:
                    self._connected.discard(session)
                    self._left.add(session)
                else:
                    continue
                self.events.append(Event(kind, len(self._connected), answered))

    @property
    def connected(self) -> int:
        """How many clients are connected now."""
        with self._lock:
            return len(self._connected)

    @property
    def arrived(self) -> int:
        """How many clients have connected so far, including those that left."""
        with self._lock:
            return len(self._connected) + len(self._left)
