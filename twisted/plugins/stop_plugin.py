"""twistd dropin for ``twistd stop``: one ServiceMaker, nothing else.

Importing the reactor or any of stop here would slow every twistd start
and break plugin-cache rebuilds; ``stop.tap`` is imported only when used.
"""

from twisted.application.service import ServiceMaker

stop = ServiceMaker(
    "stop",
    "stop.tap",
    "Session TOken Protocol (RFC 1413 ident with privacy tokens)",
    "stop",
)
