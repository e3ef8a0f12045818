"""Run a command and report its wall time and the peak memory of its whole process tree (Ray and vLLM included).

    python benchmarks/peak_memory.py [--out FILE] -- COMMAND ARGS...

Peak USS summed over the tree is the number to quote (RSS double-counts shared pages); the system-wide "used"
delta is printed beside it as a cross-check. Sampled once a second.
"""

import argparse
import subprocess
import sys
import time

import psutil


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        sys.exit("usage: peak_memory.py [--out FILE] -- COMMAND ARGS...")
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]

    start = time.time()
    baseline_used = psutil.virtual_memory().used
    process = subprocess.Popen(command)
    root = psutil.Process(process.pid)
    peak_rss = peak_uss = peak_system = 0
    while process.poll() is None:
        rss = uss = 0
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for member in tree:
            try:
                info = member.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss, uss = rss + info.rss, uss + info.uss
        peak_rss, peak_uss = max(peak_rss, rss), max(peak_uss, uss)
        peak_system = max(peak_system, psutil.virtual_memory().used - baseline_used)
        time.sleep(1.0)
    returncode = process.wait()
    gib = 2**30
    line = (f"rc={returncode} wall_s={time.time() - start:.1f} peak_tree_uss_gib={peak_uss / gib:.2f} "
            f"peak_tree_rss_gib={peak_rss / gib:.2f} peak_system_used_delta_gib={peak_system / gib:.2f}")
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(" ".join(command) + "\n" + line + "\n")
    return returncode


if __name__ == "__main__":
    sys.exit(main())
