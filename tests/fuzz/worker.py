"""Fuzz worker: ``python worker.py SPECS.jsonl RESULTS.jsonl START WORKDIR``.

Runs specs START.. one by one and appends, per case, a ``{"i", "start"}`` line before it
and ``{"i", "outcome", "why"}`` after it, each written with one unbuffered write: if a
native crash kills this process, the parent sees which case was running.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TRITON_INTERPRET", "1")

import fuzzlib  # noqa: E402


def main():
    spec_p, res_p, start, workdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    with open(spec_p) as f:
        specs = [json.loads(line) for line in f]
    import torch
    torch.set_num_threads(1)
    fd = os.open(res_p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for i in range(start, len(specs)):
        os.write(fd, (json.dumps({"i": i, "start": True}) + "\n").encode())
        try:
            outcome, why = fuzzlib.run_case(specs[i], workdir)
        except Exception as e:     # noqa: BLE001 -- a bug of the harness or an unclassified error
            outcome, why = "wrong_error", f"unhandled {type(e).__name__}: {str(e)[:300]}"
        os.write(fd, (json.dumps({"i": i, "outcome": outcome, "why": why}) + "\n").encode())
    os.close(fd)


if __name__ == "__main__":
    main()
