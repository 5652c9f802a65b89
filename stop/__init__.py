"""stop: a Session TOken Protocol (STOP) daemon, RFC 1413 compatible.

See README.rst for the layout; each module's docstring says its one job.
"""

__version__ = "0.1.0"
