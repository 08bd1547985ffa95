"""Writes the worked example's data (docs/custom-tasks.md): a small topic-classification task as a
user would bring it, comma-separated, with string labels and no id column.

    python examples/make_topic_data.py examples/topics
"""
import csv
import json
import random
import sys
from pathlib import Path

TOPICS = {
    "sports": ["match", "goal", "team", "coach", "league", "season", "striker", "referee", "tennis", "race"],
    "politics": ["vote", "party", "law", "senate", "minister", "election", "budget", "policy", "campaign", "court"],
    "tech": ["code", "chip", "robot", "software", "startup", "app", "laptop", "network", "cloud", "battery"],
}
FILLER = ["the", "a", "new", "big", "this", "week", "after", "report", "says", "again", "first", "city"]


def headline(rng: random.Random, topic: str) -> str:
    words = rng.sample(TOPICS[topic], 3) + rng.sample(FILLER, 4)
    rng.shuffle(words)
    return " ".join(words).capitalize()


def main(out: Path) -> None:
    rng = random.Random(7)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 600), ("dev", 150)):
        with open(out / f"topics-{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["headline", "topic"])
            for _ in range(n):
                topic = rng.choice(sorted(TOPICS))
                writer.writerow([headline(rng, topic), topic])
    with open(out / "new-headlines.jsonl", "w") as f:  # unlabelled input for `mtbert predict --input`
        for i in range(20):
            f.write(json.dumps({"ref": f"h{i}", "headline": headline(rng, rng.choice(sorted(TOPICS)))}) + "\n")
    print(f"wrote {out}/topics-train.csv, topics-dev.csv, new-headlines.jsonl")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/topics"))
