"""Speed of the vectorized TeamTR math on CPU: 4,096 rows x 1,024 tokens (issue 4: "well under a second").

    python benchmarks/bench_algos.py [--rows 4096] [--tokens 1024] [--repeats 7] [--threads N]

Prints a markdown table (median and min over ``--repeats`` timed runs after one warm-up) with the machine, the
library versions and the date. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from teamtr_verl import algos  # noqa: E402


def _time(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), min(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--group-size", type=int, default=8, help="trajectories per prompt")
    p.add_argument("--messages", type=int, default=2, help="rows (messages) per team trajectory")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    bs, T = args.rows, args.tokens
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(T // 4, T + 1, (bs,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    rewards = torch.zeros(bs, T)
    rewards[torch.arange(bs), lengths - 1] = torch.randint(0, 2, (bs,), generator=g).float()
    traj = np.array([f"traj-{i // args.messages}" for i in range(bs)], dtype=object)
    uid = np.array([f"prompt-{i // (args.messages * args.group_size)}" for i in range(bs)], dtype=object)
    old = -torch.rand(bs, T, generator=g) * 3
    new = old + 0.05 * torch.randn(bs, T, generator=g)
    adv = torch.randn(bs, 1, generator=g).expand(bs, T).contiguous()
    msg_index = np.arange(bs) // 2

    def loss_fwd_bwd():
        n = new.clone().requires_grad_(True)
        loss, _ = algos.teamtr_policy_loss(old, n, adv, mask, beta=0.1)
        loss.backward()

    cases = [
        (
            "advantage, one row per trajectory (stock verl)",
            lambda: algos.compute_teamtr_outcome_advantage(rewards, mask, uid),
        ),
        (
            f"advantage, {args.messages} messages per trajectory",
            lambda: algos.compute_teamtr_outcome_advantage(rewards, mask, uid, trajectory_index=traj),
        ),
        ("KL monitor k3, message_sum", lambda: algos.token_kl_monitor(old, new, mask)),
        ("KL monitor k1, message_sum", lambda: algos.token_kl_monitor(old, new, mask, estimator="k1")),
        ("KL monitor k3, token_mean", lambda: algos.token_kl_monitor(old, new, mask, reduction="token_mean")),
        (
            "KL monitor k3, message_index (2 rows/msg)",
            lambda: algos.token_kl_monitor(old, new, mask, message_index=msg_index),
        ),
        ("policy loss forward + backward (token ratio, k3)", loss_fwd_bwd),
    ]
    rows = [(name, *_time(fn, args.repeats)) for name, fn in cases]

    print(f"## teamtr_verl.algos on CPU: {bs:,} rows x {T:,} tokens\n")
    print(f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"- machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} logical CPUs, "
        f"torch threads {torch.get_num_threads()}".replace("  ", " ")
    )
    print(f"- python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    print(
        f"- group size {args.group_size}, {args.messages} messages per trajectory, "
        f"{int(mask.sum()):,} masked tokens, {args.repeats} timed runs after 1 warm-up\n"
    )
    print("| function | median (ms) | min (ms) |")
    print("|---|---:|---:|")
    for name, med, best in rows:
        print(f"| {name} | {med * 1e3:.1f} | {best * 1e3:.1f} |")


if __name__ == "__main__":
    main()
