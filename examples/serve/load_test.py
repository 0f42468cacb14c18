"""A bounded load test of the example server, on the loopback interface only.

Starts ``server.py`` on 127.0.0.1 (a free port), waits for ``/health``, sends ``--requests`` digits from
``--threads`` threads (each request times out after 10 s, the whole test after ``--deadline`` seconds),
checks every answer, prints the throughput and the share of audited answers, and stops the server it started.

    PYTHONPATH=$PWD python examples/serve/load_test.py --requests 400 --threads 8
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_healthy(url: str, process: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server at {url} was not healthy in time")


def stop(server: subprocess.Popen) -> None:
    """End the server this test started and the workers it spawned (its process group), and nothing else."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            time.sleep(0.5)  # the workers get the signal too; give them a moment
            os.killpg(server.pid, 0)  # raises once the whole group is gone
        except (subprocess.TimeoutExpired, PermissionError):
            continue
        except ProcessLookupError:
            return


def run(requests: int = 200, threads: int = 8, deadline: float = 180.0) -> dict:
    """Start the server, load it, stop it; the figures of the run."""
    from sklearn.datasets import load_digits

    images = load_digits().images.tolist()
    port = free_port()
    end = time.monotonic() + deadline
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("server.py")), "--host", HOST,
                                   "--port", str(port), "--state", f"{tmp}/state.json", "--save-every", "5"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)  # its own process group: LitServe's workers stop with it
        try:
            wait_healthy(f"http://{HOST}:{port}/health", server, end)
            url = f"http://{HOST}:{port}/predict"
            start = time.monotonic()
            with ThreadPoolExecutor(threads) as pool:
                answers = list(pool.map(lambda i: post(url, {"image": images[i % len(images)]})
                                        if time.monotonic() < end else None, range(requests)))
            elapsed = time.monotonic() - start
            state = Path(f"{tmp}/state.json")
            saved = json.loads(state.read_text()) if state.exists() else None
        finally:
            stop(server)
    done = [a for a in answers if a is not None]
    return {"requests": len(done), "seconds": elapsed, "per_second": len(done) / elapsed,
            "audited": sum(a["audited"] for a in done), "answers": done, "saved": saved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=180.0)
    args = parser.parse_args()
    figures = run(args.requests, args.threads, args.deadline)
    print(f"{figures['requests']} answers in {figures['seconds']:.1f} s ({figures['per_second']:.0f}/s), "
          f"{figures['audited']} audited")


if __name__ == "__main__":
    main()
