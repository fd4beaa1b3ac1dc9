"""Spill files alone: write N x 100 MB random arrays, then read each back and sum it.

``python -m benchmarks._spill_io [direct|buffered] [N]`` prints one JSON line: seconds and
CPU seconds of the writes and of the reads. ``buffered`` turns ``O_DIRECT`` off (as where
a file system refuses it); files just written buffered are read back from the page cache.
The arrays are made before the clock starts; the files go at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from trioscheduler.server import spill_file

MB = 1_000_000


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "direct"
    count = int(argv[1]) if len(argv) > 1 else 8
    if mode == "buffered":
        spill_file._O_DIRECT = 0
    directory = tempfile.mkdtemp(prefix="bench-spill-io-")
    try:
        paths = [os.path.join(directory, str(i)) for i in range(count)]
        values = [np.random.default_rng(i).random(100 * MB // 8) for i in range(count)]
        t0, c0 = time.perf_counter(), time.process_time()
        for path, value in zip(paths, values, strict=True):
            spill_file.write_frames(path, *spill_file.serialize(value))
        t1, c1 = time.perf_counter(), time.process_time()
        del values
        total = 0.0
        for path in paths:
            total += float(spill_file.read_value(path).sum())
        t2, c2 = time.perf_counter(), time.process_time()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps({"mode": mode, "arrays": count, "write_s": round(t1 - t0, 3),
                      "write_cpu_s": round(c1 - c0, 3), "read_s": round(t2 - t1, 3),
                      "read_cpu_s": round(c2 - c1, 3), "sum": total}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
