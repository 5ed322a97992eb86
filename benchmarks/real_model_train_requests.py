"""Chat requests to train an EAGLE-3 head on a real target, disjoint from the shipped task set.

``bench_real_models.py`` trains its EAGLE-3 heads on these, never on the tasks it
measures: the requests are made here from templates and random fillers (the same
everyday kinds as ``models/assets/tasks/everyday.jsonl``: code edits, text fixes,
reformatting, document questions, SQL), and ``training_requests`` refuses any
request whose text occurs in a task.

    python benchmarks/real_model_train_requests.py --model DIR --n 96 --out prompts.jsonl

writes JSONL lines ``{"prompt": <the request rendered with the model's chat template>}``
for ``specjax train-drafter --prompts``.
"""

from __future__ import annotations

import argparse
import json
import random

NAMES = ["Amara", "Bruno", "Chidi", "Dana", "Emeka", "Fatima", "Goran", "Hana", "Ines", "Jonas", "Kofi", "Lena"]
CITIES = ["Accra", "Bergen", "Cusco", "Dakar", "Essen", "Fukuoka", "Graz", "Hanoi", "Izmir", "Jaipur"]
ITEMS = ["stapler", "notebook", "marker", "folder", "lamp", "cable", "kettle", "scarf", "bottle", "candle"]
WORDS = ["alpha", "total", "items", "result", "data", "value", "count", "buffer", "row", "entry"]
FUNCS = [
    "def {f}({a}):\n    {v} = 0\n    for x in {a}:\n        {v} += x\n    return {v}",
    "def {f}({a}, limit):\n    {v} = []\n    for x in {a}:\n        if x < limit:\n            {v}.append(x)\n    return {v}",
    "def {f}({a}):\n    {v} = {{}}\n    for key, x in {a}:\n        {v}.setdefault(key, []).append(x)\n    return {v}",
    "def {f}({a}):\n    {v} = None\n    for x in {a}:\n        if {v} is None or x > {v}:\n            {v} = x\n    return {v}",
]
CODE_ASKS = [
    "Rename the variable `{v}` to `{w}` in this function and show the whole function:",
    "Add a docstring to this function and keep the code unchanged:",
    "Add type hints to this function without changing its body:",
    "Rewrite this function with a clearer name than `{f}` and show the result:",
]
TYPO_TEXTS = [
    "Dear {n}, thank you for you message. The package will arive on {d} and the driver will call befor delivery.",
    "Reminder: the libary will be closed on {d} for maintenence. Returns can be left in the box outside.",
    "Hello {n}, your apointment is confirmed for {d}. Please bring your insurence card and arive ten minutes early.",
]
DAYS = ["monday", "tuesday", "wednesday", "friday", "saturday"]
TABLES = [
    ("employees", "id INTEGER PRIMARY KEY, name TEXT, dept TEXT, salary REAL",
     ["the average salary per dept", "the names of employees in the dept 'sales', sorted by name",
      "the three highest paid employees"]),
    ("shipments", "id INTEGER PRIMARY KEY, city TEXT, weight REAL, sent DATE",
     ["the total weight shipped to each city", "shipments heavier than 20 sent in 2024",
      "the number of shipments per month"]),
    ("members", "id INTEGER PRIMARY KEY, name TEXT, joined DATE, plan TEXT",
     ["members who joined after 2022 on the plan 'gold'", "how many members each plan has",
      "the five newest members"]),
]


def _code_request(rng: random.Random) -> list[dict]:
    f, a, v = rng.choice(["combine", "collect", "scan", "gather"]), rng.choice(["nums", "pairs", "seq"]), rng.choice(WORDS)
    body = rng.choice(FUNCS).format(f=f, a=a, v=v)
    ask = rng.choice(CODE_ASKS).format(v=v, w=rng.choice([w for w in WORDS if w != v]), f=f)
    return [{"role": "user", "content": f"{ask}\n\n```python\n{body}\n```"}]


def _text_request(rng: random.Random) -> list[dict]:
    text = rng.choice(TYPO_TEXTS).format(n=rng.choice(NAMES), d=rng.choice(DAYS))
    return [{"role": "user", "content": f"Correct the spelling in this message and return it:\n\n{text}"}]


def _reformat_request(rng: random.Random) -> list[dict]:
    rows = [(rng.choice(NAMES), rng.choice(CITIES), rng.randint(20, 70)) for _ in range(rng.randint(2, 4))]
    if rng.random() < 0.5:
        csv = "\n".join(["person,town,years"] + [f"{n},{c},{y}" for n, c, y in rows])
        return [{"role": "user", "content": f"Turn this CSV into a JSON array of objects:\n\n{csv}"}]
    data = json.dumps([{"product": rng.choice(ITEMS), "count": rng.randint(1, 20),
                        "cost": round(rng.uniform(0.5, 30), 2)} for _ in range(rng.randint(2, 4))])
    return [{"role": "user", "content": f"Write this JSON as a Markdown table:\n\n{data}"}]


def _sql_request(rng: random.Random) -> list[dict]:
    table, columns, asks = rng.choice(TABLES)
    return [{"role": "system", "content": "You answer with a single SQLite query."},
            {"role": "user", "content": f"Schema:\nCREATE TABLE {table} ({columns});\n\nWrite a query for "
                                        f"{rng.choice(asks)}."}]


def _document_request(rng: random.Random) -> list[dict]:
    n, c, item = rng.choice(NAMES), rng.choice(CITIES), rng.choice(ITEMS)
    doc = (f"{n} ordered {rng.randint(2, 9)} x {item} on {rng.choice(DAYS)}. The parcel ships from {c} "
           f"and takes {rng.randint(2, 6)} days. Returns are free within {rng.randint(14, 30)} days.")
    return [{"role": "user", "content": f"Answer from the text.\n\nText: {doc}\n\nQuestion: What did {n} order, "
                                        "and how long does shipping take?"}]


MAKERS = (_code_request, _text_request, _reformat_request, _sql_request, _document_request)


def training_requests(n: int, seed: int = 0, tasks: list | None = None) -> list[list[dict]]:
    """``n`` distinct conversations made from templates; none shares a message text with ``tasks``
    (default: the shipped everyday tasks)."""
    from specjax.models.tasks import load_tasks

    held_out = {m["content"] for t in (tasks if tasks is not None else load_tasks()) for m in t["messages"]}
    rng = random.Random(seed)
    out, seen = [], set()
    for attempt in range(n * 50):
        if len(out) == n:
            break
        conversation = MAKERS[attempt % len(MAKERS)](rng)  # by attempt: a maker that runs dry is skipped
        key = json.dumps(conversation)
        if key in seen:
            continue
        overlap = [m["content"] for m in conversation if m["content"] in held_out]
        if overlap:
            raise ValueError(f"a training request repeats a benchmark task's message: {overlap[0][:80]!r}")
        seen.add(key)
        out.append(conversation)
    if len(out) < n:
        raise ValueError(f"the templates give only {len(out)} distinct requests, asked for {n}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the target (its chat template renders the requests)")
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from specjax.models.chat import render_chat
    from specjax.models.loading import load_model

    model = load_model(args.model)
    with open(args.out, "w") as f:
        for conversation in training_requests(args.n, args.seed):
            f.write(json.dumps({"prompt": render_chat(model, conversation)}) + "\n")
    print(f"wrote {args.n} prompts to {args.out}")


if __name__ == "__main__":
    main()
