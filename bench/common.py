"""The benchmark harness, by concern: the stack a bench starts (stack.py), its callers (callers.py), the load
patterns (load.py) and the report (report.py). The benches import these names from here.

Import this only after `gevent.monkey.patch_all()` (the bench modules do that first): the load generator runs
hundreds of callers as greenlets. Everything listens on 127.0.0.1 and every wait has a deadline.
"""
from bench.callers import *  # noqa: F401,F403
from bench.callers import TOPIC_WORDS  # noqa: F401
from bench.load import *  # noqa: F401,F403
from bench.report import *  # noqa: F401,F403
from bench.report import percentile  # noqa: F401
from bench.stack import *  # noqa: F401,F403
