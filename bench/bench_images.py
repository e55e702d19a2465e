"""Image fetch against the loopback fixture server with 50 ms latency per request.

Sequential (1 worker) vs parallel (--workers) runs of trafficdet.store.fetch_per_image,
each on a fresh store, median of --runs. The server runs in its own process so it does
not share the client's GIL. Target: parallel >= 20x sequential.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import OUT, machine, median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testkit.fixture import generate, image_records  # noqa: E402
from trafficdet.fetch import RetryPolicy  # noqa: E402
from trafficdet.store import Sources, fetch_per_image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "fixture"
        generate(root, images=args.images, seed=0)
        wanted = image_records(root)
        url_file = Path(tmp) / "url"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "testkit.fixture_server",
                str(root),
                "--latency-ms",
                str(args.latency_ms),
                "--url-file",
                str(url_file),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        try:
            while not url_file.exists():
                time.sleep(0.05)
            url = url_file.read_text().strip()
            timings: dict[int, list[float]] = {}
            for workers in [1, *args.workers]:
                for run in range(args.runs):
                    store = Path(tmp) / f"store-{workers}-{run}"
                    start = time.perf_counter()
                    sources = Sources.for_mirror(url, RetryPolicy(retries=2, backoff_s=0.1))
                    results = fetch_per_image(wanted, store, sources, workers)
                    timings.setdefault(workers, []).append(time.perf_counter() - start)
                    assert not any(outcome.reason for outcome in results.values()), results
        finally:
            server.kill()
    sequential = median(timings[1])
    result = {
        "machine": machine(),
        "images": len(wanted),
        "latency_ms": args.latency_ms,
        "runs": args.runs,
        "seconds": {str(w): round(median(t), 3) for w, t in timings.items()},
        "images_per_s": {str(w): round(len(wanted) / median(t), 1) for w, t in timings.items()},
        "speedup_vs_sequential": {str(w): round(sequential / median(t), 1) for w, t in timings.items()},
    }
    (OUT / "images.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
