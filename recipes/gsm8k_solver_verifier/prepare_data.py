"""GSM8K in verl's parquet layout (as verl's examples/data_preprocess/gsm8k.py), scored by verl's default reward.

    python recipes/gsm8k_solver_verifier/prepare_data.py [--out ~/data/gsm8k]

Needs the Hugging Face hub (datasets: openai/gsm8k, config main). `data_source` stays `openai/gsm8k`, so verl's
`default_compute_score` scores the answer message: the last `#### N`, exact match.
"""

import argparse
import os
import re

INSTRUCTION = ' Let\'s think step by step and output the final answer after "####".'


def to_row(example: dict, split: str, index: int) -> dict:
    answer = re.search(r"#### (\-?[0-9\.\,]+)", example["answer"]).group(1).replace(",", "")
    return {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": example["question"] + INSTRUCTION}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": split, "index": index},
    }


def main() -> None:
    import datasets

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.expanduser("~/data/gsm8k"))
    args = parser.parse_args()
    source = datasets.load_dataset("openai/gsm8k", "main")
    os.makedirs(args.out, exist_ok=True)
    for split in ("train", "test"):
        rows = [to_row(example, split, i) for i, example in enumerate(source[split])]
        datasets.Dataset.from_list(rows).to_parquet(os.path.join(args.out, f"{split}.parquet"))


if __name__ == "__main__":
    main()
