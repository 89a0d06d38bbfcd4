"""Does an upstream connection go back to the pool after a streamed reply? Stopping at `data: [DONE]` vs reading on.

    python -m bench.upstream_pool

Three streamed requests per way on one httpx2 client (the HTTP stack the openai SDK uses here) against the fake
LLM, then the pool's connections. A response closed before its body has ended cannot be reused, so the next
request opens a new connection (over TLS, a new handshake). Loopback only; the fake LLM is stopped at the end.
"""
import json
import subprocess
import sys
from pathlib import Path

import httpx2

REPO = Path(__file__).resolve().parents[1]

WAYS = ("stop reading at data: [DONE] (what the provider loop does)", "read until the body ends")


def main() -> int:
    fake = subprocess.Popen([sys.executable, "-m", "bench.fake_llm_server", "--ttft-ms", "5",
                             "--token-interval-ms", "1"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        port = json.loads(fake.stdout.readline())["port"]
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hello"}]}
        print("| how the stream is read | requests | connections in the pool afterwards |")
        print("|---|---|---|")
        for way in WAYS:
            with httpx2.Client(timeout=10) as client:
                for _ in range(3):
                    with client.stream("POST", url, json=body) as response:
                        for chunk in response.iter_bytes():
                            if way.startswith("stop") and b"[DONE]" in chunk:
                                break
                pool = client._transport._pool.connections
                print(f"| {way} | 3 | {len(pool)} {[str(c) for c in pool]} |")
    finally:
        fake.terminate()
        try:
            fake.wait(timeout=10)
        except subprocess.TimeoutExpired:
            fake.kill()
            fake.wait()
        if fake.stdout is not None:
            fake.stdout.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
