"""What the second gc.freeze buys: the CPU of one full collection over what the worker's SDK warm-up thread built,
before and after freezing it. Mirrors gunicorn.conf.py's hooks in one process (collector off while the app loads,
freeze, the warm-up thread, freeze again).

    python -m bench.gc_after_warm_up
"""
from gevent import monkey

monkey.patch_all()

import gc  # noqa: E402  (after patch_all)
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def full_pass_ms(rounds: int = 5) -> tuple[float, int]:
    """The cheapest of `rounds` full collections (ms of this thread's CPU), and how many objects the collector walks."""
    spent = []
    for _ in range(rounds):
        started = time.thread_time()
        gc.collect()
        spent.append((time.thread_time() - started) * 1000)
    return min(spent), sum(len(gc.get_objects(generation)) for generation in range(3))


def main() -> None:
    gc.disable()  # post_fork
    from bench.stack import server_env
    os.environ.update(server_env(Path(tempfile.mkdtemp(prefix="callweaver-gc-")), "http://127.0.0.1:9/v1",
                                 "http://127.0.0.1:9", PUBLIC_BASE_URL="http://127.0.0.1:3000"))
    from callweaver import create_app
    services = create_app().extensions["callweaver"]
    gc.freeze()  # post_worker_init, while the warm-up thread builds the SDK clients
    gc.enable()
    frozen_first = gc.get_freeze_count()
    services.wait_until_warm()
    before, walked_before = full_pass_ms()
    gc.freeze()  # the second freeze, once the warm-up has finished
    after, walked_after = full_pass_ms()
    print("| measure | after the first freeze | after the second |\n|---|---|---|")
    print(f"| one full collection (ms of CPU, best of 5) | {before:.2f} | {after:.2f} |")
    print(f"| objects the collector walks | {walked_before} | {walked_after} |")
    print(f"| frozen objects | {frozen_first} | {gc.get_freeze_count()} |")


if __name__ == "__main__":
    main()
