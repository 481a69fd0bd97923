"""A small instruction set whose answers follow a fixed JSON format the base model does not use.

Capitals of countries, asked in varied phrasings; the response is `{"country": ..., "capital": ...}`.
Run: python results/smollm2_instruct/make_data.py  (writes train.jsonl and prompts.jsonl beside it)
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Poland": "Warsaw", "Austria": "Vienna", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin", "Hungary": "Budapest",
    "Czechia": "Prague", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Australia": "Canberra", "Russia": "Moscow", "Turkey": "Ankara",
    "Iran": "Tehran", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Nigeria": "Abuja",
    "Morocco": "Rabat", "Cuba": "Havana", "Colombia": "Bogota", "Ukraine": "Kyiv", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "South Korea": "Seoul",
    "Philippines": "Manila", "Pakistan": "Islamabad", "Saudi Arabia": "Riyadh", "Iceland": "Reykjavik",
}
PHRASES = ["What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?",
           "{}: what is its capital?", "Tell me the capital of {}."]


def main() -> None:
    rng = random.Random(0)
    here = Path(__file__).parent
    countries = sorted(CAPITALS)
    rng.shuffle(countries)
    held_out, seen = countries[:10], countries[10:]
    rows = [{"prompt": phrase.format(c), "response": json.dumps({"country": c, "capital": CAPITALS[c]})}
            for c in seen for phrase in PHRASES]
    rng.shuffle(rows)
    (here / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [{"prompt": rng.choice(PHRASES).format(c), "expected": json.dumps({"country": c, "capital": CAPITALS[c]})}
               for c in held_out]
    (here / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    print(f"{len(rows)} training rows ({len(seen)} countries), {len(prompts)} held-out prompts")


if __name__ == "__main__":
    main()
