"""stop.limits.Gate: at most N holders, a bounded queue, order kept."""

from twisted.internet import defer

from stop.errors import Overloaded
from stop.limits import Gate


def refused(d) -> bool:
    out = []
    d.addErrback(lambda f: out.append(f.check(Overloaded)))
    return out == [Overloaded]


def full_gate(active: int, queue: int, waiting: int):
    """A gate whose ``active`` places are taken and with ``waiting``
    callers queued; each appends its number to the list returned with it
    when it is let in."""
    g = Gate(active, queue)
    for _ in range(active):
        assert g.enter() is None  # a free place: no Deferred
    let_in: list = []
    for i in range(waiting):
        g.enter().addCallback(lambda _, i=i: let_in.append(i))
    return g, let_in


def test_enters_queues_and_refuses():
    g = Gate(2, 1)
    assert g.enter() is None and g.enter() is None  # free places: no Deferred
    let_in = []
    g.enter().addCallback(let_in.append)
    assert refused(g.enter()) and (g.running, g.waiting) == (2, 1)
    assert let_in == []
    g.leave()  # the waiting caller takes the place
    assert let_in == [None] and (g.running, g.waiting) == (2, 0)
    g.leave()
    g.leave()
    assert g.running == 0
    assert g.enter() is None and g.running == 1


def test_waiting_callers_are_let_in_in_order():
    g, order = full_gate(1, 3, 3)
    g.leave()
    g.leave()
    assert order == [0, 1] and (g.running, g.waiting) == (1, 1)


def test_long_queue_of_instant_callers_does_not_recurse():
    # Each caller leaves as soon as it is let in (a query answered at
    # once): the queue drains in a loop, not one stack frame deeper each.
    g = Gate(1, 5000)
    assert g.enter() is None
    done = []

    def instant(_, i):
        done.append(i)
        g.leave()
    for i in range(5000):
        g.enter().addCallback(instant, i)
    g.leave()
    assert done == list(range(5000)) and (g.running, g.waiting) == (0, 0)


def test_resize_lets_waiting_callers_in_or_lets_holders_finish():
    g, let_in = full_gate(1, 2, 2)
    assert (g.running, g.waiting) == (1, 2)
    g.resize(2, 2)  # more room: one waiting caller is let in at once
    assert let_in == [0] and (g.running, g.waiting) == (2, 1)
    g.resize(1, 0)  # less: no holder is cut off, no new caller is queued
    assert (g.running, g.waiting) == (2, 1)
    assert refused(g.enter())
    g.leave()
    assert let_in == [0] and (g.running, g.waiting) == (1, 1)  # at the new limit
    g.leave()
    assert let_in == [0, 1] and (g.running, g.waiting) == (1, 0)
