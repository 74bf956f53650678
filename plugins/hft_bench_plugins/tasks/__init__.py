"""Built-in fine-tuning tasks: SST2, AG News, GSM8K (scored as in protocol.md) and Alpaca (generations only)."""

from __future__ import annotations

import re

from harmbench_ft import Example, Task, hookimpl

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AGNEWS_INSTRUCTION = "Categorize the news article given in the input into one of the 4 categories:\n\nWorld\nSports\nBusiness\nSci/Tech\n"
AGNEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]


class SST2(Task):
    name = "sst2"
    train_source = "sst2-train"
    test_source = "sst2-validation"
    max_new_tokens = 4  # "positive" / "negative" and EOS; scoring strips the response and needs nothing after it
    chance_accuracy = 50.0  # two labels

    def example(self, row: dict) -> Example:
        return Example(SST2_INSTRUCTION, row["sentence"].strip(), "positive" if row["label"] == 1 else "negative")

    def score(self, response: str, row: dict) -> bool:
        """Exact match after stripping: positive/Positive or negative/Negative (protocol.md)."""
        expected = "positive" if row["label"] == 1 else "negative"
        return response.strip() in (expected, expected.capitalize())


class AGNews(Task):
    name = "agnews"
    train_source = "agnews-train"
    test_source = "agnews-test"
    max_new_tokens = 8  # the longest label, "Sci/Tech", and EOS
    chance_accuracy = 25.0  # four labels
    test_size = 1000  # protocol.md: the first 1000 test rows

    def example(self, row: dict) -> Example:
        return Example(AGNEWS_INSTRUCTION, row["text"].strip(), AGNEWS_LABELS[row["label"]])

    def score(self, response: str, row: dict) -> bool:
        """Equals the label name, case-insensitive; "sci" is accepted for Sci/Tech."""
        answer = response.strip().lower()
        expected = AGNEWS_LABELS[row["label"]].lower()
        return answer == expected or (expected == "sci/tech" and answer == "sci")


_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def gsm8k_number(text: str) -> float | None:
    """The first number after 'The final answer is:', else the last number; commas removed."""
    marker = text.find("The final answer is:")
    candidates = _NUMBER.findall(text[marker + len("The final answer is:") :]) if marker >= 0 else []
    if not candidates:
        candidates = _NUMBER.findall(text)[-1:]
    if not candidates:
        return None
    try:
        return float(candidates[0].replace(",", "").rstrip("."))
    except ValueError:
        return None


class GSM8K(Task):
    name = "gsm8k"
    train_source = "gsm8k-train"
    test_source = "gsm8k-test"
    max_new_tokens = 200  # protocol.md: up to 200 new tokens (a worked solution, then "The final answer is: N")
    test_size = 1000  # protocol.md: the first 1000 test rows

    def example(self, row: dict) -> Example:
        return Example(row["question"], "", row["answer"].replace("####", "The final answer is:"))

    def score(self, response: str, row: dict) -> bool:
        reference = float(row["answer"].split("####")[-1].strip().replace(",", ""))
        predicted = gsm8k_number(response)
        return predicted is not None and abs(predicted - reference) < 1e-6


class Alpaca(Task):
    name = "alpaca"
    train_source = "alpaca-train"
    test_source = "alpaca-train"  # generations only: win rate needs an external judge
    scored = False

    def example(self, row: dict) -> Example:
        return Example(row["instruction"], row.get("input") or "", row["output"])

    def score(self, response: str, row: dict) -> bool:
        raise NotImplementedError("alpaca is generation-only")


@hookimpl
def hft_register_tasks(register):
    for task in (SST2(), AGNews(), GSM8K(), Alpaca()):
        register(task)
