"""Speed of the vectorized TeamTR math: 4,096 rows x 1,024 tokens (issue 4: "well under a second").

    python benchmarks/bench_algos.py [--rows 4096] [--tokens 1024] [--repeats 7] [--threads N] [--device cuda --check]

``--device cuda --check`` runs every function on the GPU and compares its outputs with the CPU's (a GPU recipe's loss
and KL run on the actor's device).

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


def make_inputs(args, device: str) -> dict:
    """The benchmark's tensors, built on CPU from one seed and moved to ``device`` (same values everywhere)."""
    bs, T = args.rows, args.tokens
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(T // 4, T + 1, (bs,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    rewards = torch.zeros(bs, T)
    rewards[torch.arange(bs), lengths - 1] = torch.randint(0, 2, (bs,), generator=g).float()
    old = -torch.rand(bs, T, generator=g) * 3
    new = old + 0.05 * torch.randn(bs, T, generator=g)
    adv = torch.randn(bs, 1, generator=g).expand(bs, T).contiguous()
    tensors = {"mask": mask, "rewards": rewards, "old": old, "new": new, "adv": adv,
               "row_adv": adv[:, 0].clone(), "group_size": torch.full((bs,), float(args.group_size))}
    inputs = {k: v.to(device) for k, v in tensors.items()}
    inputs["traj"] = np.array([f"traj-{i // args.messages}" for i in range(bs)], dtype=object)
    inputs["uid"] = np.array([f"prompt-{i // (args.messages * args.group_size)}" for i in range(bs)], dtype=object)
    inputs["msg_index"] = np.arange(bs) // 2
    return inputs


def cases(args, x: dict) -> list:
    """(name, function returning the outputs) for every benchmarked function of teamtr_verl.algos."""

    def loss_fwd_bwd():
        n = x["new"].clone().requires_grad_(True)
        loss, _ = algos.teamtr_policy_loss(x["old"], n, x["adv"], x["mask"], beta=0.1)
        loss.backward()
        return loss, n.grad

    def surrogate():
        return algos.surrogate_gain(x["old"], x["new"], x["row_adv"], x["mask"])

    return [
        ("advantage, one row per trajectory (stock verl)",
         lambda: algos.compute_teamtr_outcome_advantage(x["rewards"], x["mask"], x["uid"])),
        (f"advantage, {args.messages} messages per trajectory",
         lambda: algos.compute_teamtr_outcome_advantage(x["rewards"], x["mask"], x["uid"], trajectory_index=x["traj"])),
        ("KL monitor k3, message_sum", lambda: algos.token_kl_monitor(x["old"], x["new"], x["mask"])),
        ("KL monitor k1, message_sum", lambda: algos.token_kl_monitor(x["old"], x["new"], x["mask"], estimator="k1")),
        ("KL monitor k3, token_mean",
         lambda: algos.token_kl_monitor(x["old"], x["new"], x["mask"], reduction="token_mean")),
        ("KL monitor k3, message_index (2 rows/msg)",
         lambda: algos.token_kl_monitor(x["old"], x["new"], x["mask"], message_index=x["msg_index"])),
        ("policy loss forward + backward (token ratio, k3)", loss_fwd_bwd),
        ("surrogate gain (the line search's check)", surrogate),
    ]


def _flatten(value) -> list:
    if isinstance(value, (tuple, list)):
        return [item for part in value for item in _flatten(part)]
    if isinstance(value, dict):
        return [item for key in sorted(value) for item in _flatten(value[key])]
    if hasattr(value, "__dataclass_fields__"):
        return [item for name in value.__dataclass_fields__ for item in _flatten(getattr(value, name))]
    if isinstance(value, torch.Tensor):
        return [value.detach().double().cpu()]
    if isinstance(value, (int, float)):
        return [torch.tensor(float(value), dtype=torch.float64)]
    return []  # strings, numpy labels: not numeric outputs


def max_difference(reference, other) -> float:
    """Largest absolute difference between two outputs of the same function (CPU vs another device)."""
    a, b = _flatten(reference), _flatten(other)
    if len(a) != len(b):
        raise AssertionError(f"outputs differ in structure: {len(a)} vs {len(b)} numbers/tensors")
    return max(((x - y).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--group-size", type=int, default=8, help="trajectories per prompt")
    p.add_argument("--messages", type=int, default=2, help="rows (messages) per team trajectory")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the tensors live")
    p.add_argument("--check", action="store_true", help="also compare every output with the CPU result")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def timed(fn):
        def run():
            out = fn()
            sync()
            return out
        return run

    device_cases = cases(args, make_inputs(args, args.device))
    rows = [(name, *_time(timed(fn), args.repeats)) for name, fn in device_cases]
    checks = {}
    if args.check:
        cpu_cases = cases(args, make_inputs(args, "cpu"))
        checks = {name: max_difference(cpu_fn(), fn()) for (name, fn), (_, cpu_fn) in zip(device_cases, cpu_cases)}

    bs, T = args.rows, args.tokens
    mask = make_inputs(args, "cpu")["mask"]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"## teamtr_verl.algos on {device_name}: {bs:,} rows x {T:,} tokens\n")
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
    print("| function | median (ms) | min (ms) |" + (" max abs difference vs CPU |" if checks else ""))
    print("|---|---:|---:|" + ("---:|" if checks else ""))
    for name, med, best in rows:
        extra = f" {checks[name]:.2e} |" if checks else ""
        print(f"| {name} | {med * 1e3:.1f} | {best * 1e3:.1f} |{extra}")
    if checks and max(checks.values()) > 1e-3:
        raise SystemExit(f"outputs on {args.device} differ from CPU: {checks}")


if __name__ == "__main__":
    main()
