"""Math data for the three-agent team, in verl's parquet layout.

    python recipes/math_team/prepare_data.py [--out ~/data/math_team] [--train agentica-org/DeepScaleR-Preview-Dataset]

Train: DeepScaleR-style problems (`problem`, `answer`); test: MATH-500 (`HuggingFaceH4/MATH-500`) and, with --aime,
AIME 2024 (`Maxwell-Jia/AIME_2024`: `Problem`, `Answer`). Needs the Hugging Face hub. Scored by recipes/math_team/reward.py.
"""

import argparse
import os

INSTRUCTION = " Let's think step by step and output the final answer within \\boxed{}."


def to_row(problem: str, answer, data_source: str, split: str, index: int) -> dict:
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": problem.strip() + INSTRUCTION}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(answer).strip()},
        "extra_info": {"split": split, "index": index},
    }


def convert(examples, data_source: str, split: str, problem_key: str = "problem", answer_key: str = "answer") -> list:
    return [to_row(e[problem_key], e[answer_key], data_source, split, i) for i, e in enumerate(examples)]


def main() -> None:
    import datasets

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.expanduser("~/data/math_team"))
    parser.add_argument("--train", default="agentica-org/DeepScaleR-Preview-Dataset")
    parser.add_argument("--aime", action="store_true", help="also AIME 2024 as test_aime.parquet")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    train = convert(datasets.load_dataset(args.train, split="train"), args.train, "train")
    datasets.Dataset.from_list(train).to_parquet(os.path.join(args.out, "train.parquet"))
    test = convert(datasets.load_dataset("HuggingFaceH4/MATH-500", split="test"), "HuggingFaceH4/MATH-500", "test")
    datasets.Dataset.from_list(test).to_parquet(os.path.join(args.out, "test.parquet"))
    if args.aime:
        aime = convert(datasets.load_dataset("Maxwell-Jia/AIME_2024", split="train"), "aime24", "test",
                       problem_key="Problem", answer_key="Answer")
        datasets.Dataset.from_list(aime).to_parquet(os.path.join(args.out, "test_aime.parquet"))


if __name__ == "__main__":
    main()
