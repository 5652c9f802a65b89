"""stop.limits.Gate: at most N running, a bounded queue, order kept."""

from twisted.internet import defer

from stop.errors import Overloaded
from stop.limits import Gate


def test_runs_queues_and_refuses():
    g = Gate(2, 1)
    held = [defer.Deferred() for _ in range(3)]
    results = []
    for d in held:
        g.run(lambda d=d: d).addBoth(results.append)
    refused = []
    g.run(lambda: 1 / 0).addErrback(lambda f: refused.append(f.check(Overloaded)))
    assert refused == [Overloaded] and (g.running, g.waiting) == (2, 1)
    held[0].callback("a")
    assert results == ["a"] and (g.running, g.waiting) == (2, 0)
    held[2].callback("c")
    held[1].callback("b")
    assert results == ["a", "c", "b"] and g.running == 0


def test_exceptions_are_failures_and_free_the_place():
    g = Gate(1, 0)
    out = []
    g.run(lambda: 1 / 0).addErrback(lambda f: out.append(f.type))
    assert out == [ZeroDivisionError] and g.running == 0


def test_long_queue_of_instant_calls_does_not_recurse():
    g = Gate(1, 5000)
    first = defer.Deferred()
    done = []
    g.run(lambda: first)
    for i in range(5000):
        g.run(lambda i=i: i).addCallback(done.append)
    first.callback(None)
    assert done == list(range(5000)) and g.running == 0


def test_resize_starts_waiting_calls_or_lets_running_ones_finish():
    g = Gate(1, 2)
    held = [defer.Deferred() for _ in range(3)]
    for d in held:
        g.run(lambda d=d: d)
    assert (g.running, g.waiting) == (1, 2)
    g.resize(2, 2)  # more room: one waiting call starts at once
    assert (g.running, g.waiting) == (2, 1)
    g.resize(1, 0)  # less: nothing is cancelled, no new call is queued
    assert (g.running, g.waiting) == (2, 1)
    refused = []
    g.run(lambda: None).addErrback(lambda f: refused.append(f.check(Overloaded)))
    assert refused == [Overloaded]
    held[0].callback(None)
    assert (g.running, g.waiting) == (1, 1)  # at the new limit: the waiting one still waits
    held[1].callback(None)
    assert (g.running, g.waiting) == (1, 0)
