"""Start-up time of every console script: ``TOOL --help`` in a fresh process, against ``python -c pass``.

For each script of ``setup.py``'s ``console_scripts`` (run through the same interpreter, so the venv's
packages are used) this times ``--help`` ``--repeats`` times and keeps the median, and records which of
the heavy packages (fairseq, torch, matplotlib, sklearn) its module imports at start-up
(``sys.modules`` after the import). The ratio to an empty interpreter in the same run is what to compare
across machines; the seconds are noisy on a shared CPU.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 5] [--out benchmarks/results/startup.json]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("fairseq", "torch", "matplotlib", "sklearn")


def console_scripts() -> dict:
    """``name -> "module:function"`` from setup.py."""
    text = open(os.path.join(REPO, "setup.py")).read()
    return dict(re.findall(r'"(fairseq-pdd-[\w-]+) = ([\w.]+:\w+)"', text))


def median_seconds(argv, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def heavy_imports(module: str) -> list:
    """The heavy packages in ``sys.modules`` after importing ``module``."""
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())
    return [name for name in HEAVY if name in loaded]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "startup.json"))
    args = parser.parse_args(argv)
    env_note = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    baseline = median_seconds([sys.executable, "-c", "pass"], args.repeats)
    rows = []
    for name, target in sorted(console_scripts().items()):
        module, function = target.split(":")
        call = f"import sys; sys.argv = ['{name}', '--help']; from {module} import {function}; {function}()"
        if name == "fairseq-pdd-user-dir":  # takes no options
            call = f"from {module} import {function}; {function}()"
        seconds = median_seconds([sys.executable, "-c", call], args.repeats)
        rows.append({"script": name, "module": module, "seconds": round(seconds, 3),
                     "ratio_to_empty_python": round(seconds / baseline, 1), "imports": heavy_imports(module)})
    print(f"empty interpreter: {baseline:.3f} s (median of {args.repeats})")
    print(f"{'script':34s} {'--help s':>9s} {'x empty':>8s}  heavy imports at start-up")
    for row in rows:
        print(f"{row['script']:34s} {row['seconds']:9.3f} {row['ratio_to_empty_python']:8.1f}  "
              f"{' '.join(row['imports']) or '-'}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"empty_python_s": round(baseline, 3), "repeats": args.repeats, "env": env_note, "scripts": rows},
                  f, indent=1)


if __name__ == "__main__":
    main()
