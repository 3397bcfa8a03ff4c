"""Share of responses written in French, per JSONL file written by generate.py.

    python experiments/french_style/measure.py outputs/generate/*/responses.jsonl

A response counts as French when it has at least two French function words and more French
than English ones: crude, but it separates SmolLM2's French from its English reliably.
"""

import json
import re
import sys

FRENCH = set("le la les de des du un une et est sont vous nous je tu il elle ce cette pour que qui dans pas sur avec au aux mais ou votre vos ne plus très c'est j'ai".split())
ENGLISH = set("the and is are you we i he she it this that for with not on in of to your can be have has but or very".split())


def is_french(text: str) -> bool:
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ']+", text.lower())
    fr = sum(w in FRENCH for w in words)
    en = sum(w in ENGLISH for w in words)
    return fr >= 2 and fr > en


def main(paths: list[str]) -> None:
    for path in paths:
        rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        french = sum(is_french(r["response"]) for r in rows)
        print(f"{french}/{len(rows)} French  ({french / max(len(rows), 1):.0%})  {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
