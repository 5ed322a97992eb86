"""A synthetic text-to-SQL corpus: the training data and demo prompts of the embedded model.

Everything here is our own: four small database schemas written as ``CREATE TABLE``
lines, natural-language questions from templates, and the gold SQL. One example is::

    -- schema:
    CREATE TABLE singer (singer_id INT, name TEXT, country TEXT, age INT, ...);
    ...
    -- question: How many singers are older than 30?
    SELECT COUNT(*) FROM singer WHERE age > 30;

The prompt is everything up to and including the question line's newline; the
model's answer is the SQL line (followed by EOS in training). Table and column names
in the answer are copied from the schema in the prompt, which is the workload where
suffix and prompt-lookup drafting shine.

Generation is deterministic: the same ``(n, seed, split)`` always gives the same
examples (``random.Random`` seeded with a string, independent of PYTHONHASHSEED).
Demo and evaluation questions are held out from the shipped models' training data
(:func:`held_out_examples`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import random
from typing import Callable, Iterator, Optional, Sequence

__all__ = ["Column", "Table", "Schema", "Example", "SCHEMAS", "SHIPPED_TRAINING_SETS", "schema_text",
           "sql_examples", "held_out_examples", "is_held_out", "seen_in_training", "sql_prompts", "format_prompt"]


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    sql_type: str  # INT, REAL or TEXT
    nl: str  # how questions refer to it ("age", "ticket price")
    kind: str  # "id" (keys), "num" (numeric), "cat" (categorical text), "label" (names/titles)
    values: tuple = ()  # cat/label: candidate values; num: (low, high) inclusive


@dataclasses.dataclass(frozen=True)
class Table:
    name: str
    plural: str  # "singers"
    singular: str  # "singer"
    columns: tuple[Column, ...]
    foreign_keys: tuple[tuple[str, str, str], ...] = ()  # (column, other table, other column)

    def col(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    def of_kind(self, *kinds: str) -> list[Column]:
        return [c for c in self.columns if c.kind in kinds]


@dataclasses.dataclass(frozen=True)
class Schema:
    name: str
    tables: tuple[Table, ...]

    def table(self, name: str) -> Table:
        return next(t for t in self.tables if t.name == name)


@dataclasses.dataclass(frozen=True)
class Example:
    schema: str
    question: str
    sql: str
    prompt: str  # schema block + question line, ending in a newline

    @property
    def text(self) -> str:
        """Prompt and answer: the training text (EOS is appended by the tokenizer side)."""
        return self.prompt + self.sql


def _id(name: str) -> Column:
    return Column(name, "INT", name.replace("_", " "), "id")


def _num(name: str, nl: str, low: int, high: int, sql_type: str = "INT") -> Column:
    return Column(name, sql_type, nl, "num", (low, high))


def _cat(name: str, nl: str, *values: str) -> Column:
    return Column(name, "TEXT", nl, "cat", tuple(values))


def _label(name: str, nl: str, *values: str) -> Column:
    return Column(name, "TEXT", nl, "label", tuple(values))


_PEOPLE = ("Ana Silva", "Ben Carter", "Chen Wei", "Dara Okafor", "Eva Novak", "Farid Haddad", "Gina Rossi",
           "Hiro Tanaka", "Ines Duarte", "Jon Berg", "Kemal Aydin", "Lena Fischer", "Mira Patel", "Noah Kim")
_COUNTRIES = ("France", "Japan", "Brazil", "Canada", "Kenya", "Germany", "India", "Mexico", "Spain", "USA")
_CITIES = ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Austin", "Madrid", "Seoul", "Lagos", "Berlin")

SCHEMAS: dict[str, Schema] = {s.name: s for s in (
    Schema("concert_singer", (
        Table("stadium", "stadiums", "stadium", (
            _id("stadium_id"), _label("name", "name", "Riverside Arena", "North Dome", "Lakeview Park",
                                      "Sun Bowl", "Harbor Field"),
            _cat("location", "location", *_CITIES), _num("capacity", "capacity", 5000, 90000),
            _num("opened", "opening year", 1950, 2020))),
        Table("singer", "singers", "singer", (
            _id("singer_id"), _label("name", "name", *_PEOPLE), _cat("country", "country", *_COUNTRIES),
            _num("age", "age", 18, 75), _cat("genre", "genre", "pop", "rock", "jazz", "folk", "soul"))),
        Table("concert", "concerts", "concert", (
            _id("concert_id"), _label("concert_name", "concert name", "Spring Lights", "Night Waves",
                                      "Echoes", "Summer Jam", "Blue Hour"),
            _cat("theme", "theme", "charity", "tour", "festival", "award"), _id("stadium_id"),
            _num("year", "year", 2000, 2024)),
            (("stadium_id", "stadium", "stadium_id"),)),
        Table("singer_in_concert", "singer appearances", "singer appearance", (
            _id("concert_id"), _id("singer_id")),
            (("concert_id", "concert", "concert_id"), ("singer_id", "singer", "singer_id"))),
    )),
    Schema("store", (
        Table("customers", "customers", "customer", (
            _id("customer_id"), _label("name", "name", *_PEOPLE), _cat("city", "city", *_CITIES),
            _cat("country", "country", *_COUNTRIES), _num("joined_year", "joining year", 2010, 2024))),
        Table("products", "products", "product", (
            _id("product_id"), _label("name", "name", "desk lamp", "coffee mug", "notebook", "backpack",
                                      "headphones", "water bottle"),
            _cat("category", "category", "office", "kitchen", "travel", "audio", "sports"),
            _num("price", "price", 2, 400, "REAL"), _num("stock", "stock", 0, 500))),
        Table("orders", "orders", "order", (
            _id("order_id"), _id("customer_id"), _cat("status", "status", "shipped", "pending", "cancelled",
                                                       "returned"),
            _num("amount", "amount", 5, 2000, "REAL"), _num("order_year", "order year", 2015, 2024)),
            (("customer_id", "customers", "customer_id"),)),
        Table("order_items", "order items", "order item", (
            _id("order_id"), _id("product_id"), _num("quantity", "quantity", 1, 20)),
            (("order_id", "orders", "order_id"), ("product_id", "products", "product_id"))),
        Table("employees", "employees", "employee", (
            _id("employee_id"), _label("name", "name", *_PEOPLE),
            _cat("role", "role", "cashier", "manager", "clerk", "driver"), _num("salary", "salary", 20000, 120000),
            _cat("city", "city", *_CITIES))),
    )),
    Schema("school", (
        Table("departments", "departments", "department", (
            _id("dept_id"), _label("name", "name", "Physics", "History", "Biology", "Music", "Economics"),
            _cat("building", "building", "North Hall", "Main Hall", "Annex", "West Wing"),
            _num("budget", "budget", 100000, 900000))),
        Table("teachers", "teachers", "teacher", (
            _id("teacher_id"), _label("name", "name", *_PEOPLE), _id("dept_id"),
            _num("salary", "salary", 30000, 150000), _num("hire_year", "hiring year", 1990, 2024)),
            (("dept_id", "departments", "dept_id"),)),
        Table("students", "students", "student", (
            _id("student_id"), _label("name", "name", *_PEOPLE),
            _cat("major", "major", "math", "biology", "history", "music", "physics"),
            _num("gpa", "GPA", 1, 4, "REAL"), _num("age", "age", 17, 40), _cat("city", "city", *_CITIES))),
        Table("courses", "courses", "course", (
            _id("course_id"), _label("title", "title", "Algebra", "Genetics", "World History", "Harmony",
                                     "Mechanics"),
            _id("dept_id"), _num("credits", "credits", 1, 6)),
            (("dept_id", "departments", "dept_id"),)),
        Table("enrollments", "enrollments", "enrollment", (
            _id("student_id"), _id("course_id"), _cat("grade", "grade", "A", "B", "C", "D", "F")),
            (("student_id", "students", "student_id"), ("course_id", "courses", "course_id"))),
    )),
    Schema("flights", (
        Table("airlines", "airlines", "airline", (
            _id("airline_id"), _label("name", "name", "Blue Sky", "Aurora Air", "Condor Jet", "Pacific Wings"),
            _cat("country", "country", *_COUNTRIES), _num("fleet_size", "fleet size", 5, 400))),
        Table("airports", "airports", "airport", (
            _id("airport_id"), _label("code", "code", "CDG", "HND", "LIM", "OSL", "CAI", "AUS", "MAD"),
            _cat("city", "city", *_CITIES), _num("elevation", "elevation", 0, 3000))),
        Table("flights", "flights", "flight", (
            _id("flight_id"), _id("airline_id"), _id("airport_id"), _num("distance", "distance", 200, 12000),
            _num("price", "price", 40, 2500, "REAL"), _num("duration", "duration", 1, 16)),
            (("airline_id", "airlines", "airline_id"), ("airport_id", "airports", "airport_id"))),
        Table("passengers", "passengers", "passenger", (
            _id("passenger_id"), _label("name", "name", *_PEOPLE), _num("age", "age", 1, 95),
            _cat("nationality", "nationality", *_COUNTRIES))),
        Table("bookings", "bookings", "booking", (
            _id("booking_id"), _id("passenger_id"), _id("flight_id"),
            _cat("seat_class", "seat class", "economy", "business", "first")),
            (("passenger_id", "passengers", "passenger_id"), ("flight_id", "flights", "flight_id"))),
    )),
)}


def schema_text(schema: Schema) -> str:
    """The schema as CREATE TABLE lines, one per table, each ending in a newline."""
    lines = []
    for t in schema.tables:
        cols = ", ".join(f"{c.name} {c.sql_type}" for c in t.columns)
        lines.append(f"CREATE TABLE {t.name} ({cols});\n")
    return "".join(lines)


def format_prompt(schema: Schema, question: str) -> str:
    """``-- schema:`` block, then ``-- question: ...`` and a newline: the model answers with SQL."""
    return f"-- schema:\n{schema_text(schema)}-- question: {question}\n"


# ---- question templates: each returns (question, sql) or None when the table does not fit ----

def _value(rng: random.Random, col: Column) -> str:
    """A literal for a WHERE clause, formatted the same in the question and the SQL."""
    if col.kind == "num":
        low, high = col.values
        if col.sql_type == "REAL" and high <= 10:
            return f"{rng.randint(low * 10, high * 10) / 10:.1f}"
        v = rng.randint(low, high)
        if high - low >= 1000:  # round numbers for wide ranges, as people ask
            v = max(low, round(v, -2 if high - low < 20000 else -3))
        return str(v)
    return rng.choice(col.values)


def _plural(words: str) -> str:
    """English plural of a column phrase ("city" -> "cities", "class" -> "classes")."""
    if words.endswith("y") and words[-2:-1] not in ("a", "e", "o", "u"):
        return words[:-1] + "ies"
    if words.endswith(("s", "x", "ch", "sh")):
        return words + "es"
    return words + "s"


def _a(words: str) -> str:
    """The phrase with its indefinite article ("an age", "a price")."""
    return ("an " if words[:1].lower() in "aeiou" else "a ") + words


def _pick(rng, seq):
    return rng.choice(seq) if seq else None


def _t_count_all(rng, s, t):
    q = rng.choice(["How many {p} are there?", "Count the number of {p}.", "What is the total number of {p}?"])
    return q.format(p=t.plural), f"SELECT COUNT(*) FROM {t.name};"


_CMP = (("greater than", ">"), ("more than", ">"), ("less than", "<"), ("below", "<"), ("at least", ">="),
        ("at most", "<="))


def _t_count_where_num(rng, s, t):
    c = _pick(rng, t.of_kind("num"))
    if c is None:
        return None
    words, op = rng.choice(_CMP)
    v = _value(rng, c)
    if c.name == "age" and op in (">", "<") and rng.random() < 0.5:
        words = "older than" if op == ">" else "younger than"
        return (f"How many {t.plural} are {words} {v}?", f"SELECT COUNT(*) FROM {t.name} WHERE age {op} {v};")
    q = rng.choice(["How many {p} have {ac} {w} {v}?", "Count the {p} whose {c} is {w} {v}."])
    return q.format(p=t.plural, c=c.nl, ac=_a(c.nl), w=words, v=v), f"SELECT COUNT(*) FROM {t.name} WHERE {c.name} {op} {v};"


def _t_count_where_cat(rng, s, t):
    c = _pick(rng, t.of_kind("cat"))
    if c is None:
        return None
    v = _value(rng, c)
    q = rng.choice(["How many {p} have {c} '{v}'?", "Count the {p} whose {c} is '{v}'."])
    return q.format(p=t.plural, c=c.nl, v=v), f"SELECT COUNT(*) FROM {t.name} WHERE {c.name} = '{v}';"


def _t_list_where(rng, s, t):
    shown = _pick(rng, t.of_kind("label", "num", "cat"))
    cond = _pick(rng, [c for c in t.of_kind("num", "cat") if c is not shown])
    if shown is None or cond is None:
        return None
    v = _value(rng, cond)
    if cond.kind == "num":
        words, op = rng.choice(_CMP)
        q = f"List the {shown.nl} of {t.plural} with {cond.nl} {words} {v}."
        return q, f"SELECT {shown.name} FROM {t.name} WHERE {cond.name} {op} {v};"
    q = rng.choice(["List the {a} of {p} whose {c} is '{v}'.", "What are the {aa} of the {p} with {c} '{v}'?"])
    return (q.format(a=shown.nl, aa=_plural(shown.nl), p=t.plural, c=cond.nl, v=v),
            f"SELECT {shown.name} FROM {t.name} WHERE {cond.name} = '{v}';")


def _t_list_two_conditions(rng, s, t):
    shown = _pick(rng, t.of_kind("label"))
    nums, cats = t.of_kind("num"), t.of_kind("cat")
    if shown is None or not nums or not cats:
        return None
    n, c = rng.choice(nums), rng.choice(cats)
    words, op = rng.choice(_CMP)
    nv, cv = _value(rng, n), _value(rng, c)
    q = f"Find the {shown.nl} of {t.plural} whose {c.nl} is '{cv}' and whose {n.nl} is {words} {nv}."
    return q, f"SELECT {shown.name} FROM {t.name} WHERE {c.name} = '{cv}' AND {n.name} {op} {nv};"


def _t_order_by(rng, s, t):
    shown = _pick(rng, t.of_kind("label", "cat"))
    key = _pick(rng, t.of_kind("num"))
    if shown is None or key is None:
        return None
    desc = rng.random() < 0.5
    q = (f"List the {shown.nl} of all {t.plural} ordered by {key.nl} "
         f"{'in descending order' if desc else 'in ascending order'}.")
    return q, f"SELECT {shown.name} FROM {t.name} ORDER BY {key.name} {'DESC' if desc else 'ASC'};"


def _t_top_k(rng, s, t):
    shown = _pick(rng, t.of_kind("label"))
    key = _pick(rng, t.of_kind("num"))
    if shown is None or key is None:
        return None
    k = rng.randint(1, 5)
    high = rng.random() < 0.5
    if k == 1:
        q = f"What is the {shown.nl} of the {t.singular} with the {'highest' if high else 'lowest'} {key.nl}?"
    else:
        q = f"Show the {shown.nl} of the {k} {t.plural} with the {'highest' if high else 'lowest'} {key.nl}."
    return q, f"SELECT {shown.name} FROM {t.name} ORDER BY {key.name} {'DESC' if high else 'ASC'} LIMIT {k};"


_AGGS = (("average", "AVG"), ("maximum", "MAX"), ("minimum", "MIN"), ("total", "SUM"))


def _t_aggregate(rng, s, t):
    c = _pick(rng, t.of_kind("num"))
    if c is None:
        return None
    words, fn = rng.choice(_AGGS)
    if rng.random() < 0.4 and t.of_kind("cat"):
        g = rng.choice(t.of_kind("cat"))
        v = _value(rng, g)
        return (f"What is the {words} {c.nl} of {t.plural} whose {g.nl} is '{v}'?",
                f"SELECT {fn}({c.name}) FROM {t.name} WHERE {g.name} = '{v}';")
    return f"What is the {words} {c.nl} of all {t.plural}?", f"SELECT {fn}({c.name}) FROM {t.name};"


def _t_group_count(rng, s, t):
    g = _pick(rng, t.of_kind("cat"))
    if g is None:
        return None
    q = rng.choice(["How many {p} are there for each {g}?", "Show each {g} and the number of {p} with it."])
    return q.format(p=t.plural, g=g.nl), f"SELECT {g.name}, COUNT(*) FROM {t.name} GROUP BY {g.name};"


def _t_group_agg(rng, s, t):
    g, c = _pick(rng, t.of_kind("cat")), _pick(rng, t.of_kind("num"))
    if g is None or c is None:
        return None
    words, fn = rng.choice(_AGGS)
    return (f"For each {g.nl}, what is the {words} {c.nl} of {t.plural}?",
            f"SELECT {g.name}, {fn}({c.name}) FROM {t.name} GROUP BY {g.name};")


def _t_distinct(rng, s, t):
    c = _pick(rng, t.of_kind("cat"))
    if c is None:
        return None
    q = rng.choice(["List the distinct {c} of {p}.", "What are the different {c} of the {p}?"])
    return q.format(c=_plural(c.nl), p=t.plural), f"SELECT DISTINCT {c.name} FROM {t.name};"


def _t_between(rng, s, t):
    shown, c = _pick(rng, t.of_kind("label")), _pick(rng, t.of_kind("num"))
    if shown is None or c is None:
        return None
    a, b = sorted((_value(rng, c), _value(rng, c)), key=float)
    if a == b:
        return None
    return (f"Which {t.plural} have {_a(c.nl)} between {a} and {b}? Give their {_plural(shown.nl)}.",
            f"SELECT {shown.name} FROM {t.name} WHERE {c.name} BETWEEN {a} AND {b};")


def _t_join(rng, s, t):
    if not t.foreign_keys:
        return None
    fk, other_name, other_key = rng.choice(t.foreign_keys)
    o = s.table(other_name)
    mine = _pick(rng, t.of_kind("label", "num", "cat"))
    theirs = _pick(rng, o.of_kind("label"))
    if mine is None or theirs is None:
        return None
    q = f"Show the {mine.nl} of each {t.singular} and the {theirs.nl} of its {o.singular}."
    return q, (f"SELECT T1.{mine.name}, T2.{theirs.name} FROM {t.name} AS T1 JOIN {o.name} AS T2 "
               f"ON T1.{fk} = T2.{other_key};")


def _t_join_where(rng, s, t):
    if not t.foreign_keys:
        return None
    fk, other_name, other_key = rng.choice(t.foreign_keys)
    o = s.table(other_name)
    theirs = _pick(rng, o.of_kind("label"))
    cond = _pick(rng, t.of_kind("cat", "num"))
    if theirs is None or cond is None:
        return None
    v = _value(rng, cond)
    if cond.kind == "num":
        words, op = rng.choice(_CMP)
        where, wq = f"T1.{cond.name} {op} {v}", f"with {cond.nl} {words} {v}"
    else:
        where, wq = f"T1.{cond.name} = '{v}'", f"with {cond.nl} '{v}'"
    q = f"List the {_plural(theirs.nl)} of {o.plural} that have {t.plural} {wq}."
    return q, (f"SELECT DISTINCT T2.{theirs.name} FROM {t.name} AS T1 JOIN {o.name} AS T2 "
               f"ON T1.{fk} = T2.{other_key} WHERE {where};")


def _t_join_group(rng, s, t):
    if not t.foreign_keys:
        return None
    fk, other_name, other_key = rng.choice(t.foreign_keys)
    o = s.table(other_name)
    theirs = _pick(rng, o.of_kind("label"))
    if theirs is None:
        return None
    q = f"How many {t.plural} does each {o.singular} have? Show the {theirs.nl} and the count."
    return q, (f"SELECT T2.{theirs.name}, COUNT(*) FROM {t.name} AS T1 JOIN {o.name} AS T2 "
               f"ON T1.{fk} = T2.{other_key} GROUP BY T2.{theirs.name};")


_TEMPLATES: tuple[Callable, ...] = (
    _t_count_all, _t_count_where_num, _t_count_where_cat, _t_list_where, _t_list_two_conditions,
    _t_order_by, _t_top_k, _t_aggregate, _t_group_count, _t_group_agg, _t_distinct, _t_between,
    _t_join, _t_join_where, _t_join_group,
)


def _example_stream(seed: int, split: str, names: Sequence[str]) -> Iterator[Example]:
    """The endless example stream of ``(seed, split)`` over the schemas ``names``."""
    rng = random.Random(f"specjax-toy-sql/{split}/{seed}")
    while True:
        schema = SCHEMAS[rng.choice(names)]
        table = rng.choice(schema.tables)
        made = rng.choice(_TEMPLATES)(rng, schema, table)
        if made is not None:
            question, sql = made
            yield Example(schema.name, question, sql, format_prompt(schema, question))


def _schema_names(schemas: Optional[Sequence[str]]) -> list[str]:
    names = list(schemas) if schemas is not None else sorted(SCHEMAS)
    unknown = [s for s in names if s not in SCHEMAS]
    if unknown:
        raise ValueError(f"unknown schema(s) {unknown}; known: {sorted(SCHEMAS)}")
    return names


def sql_examples(n: int, seed: int = 0, split: str = "train",
                 schemas: Optional[Sequence[str]] = None) -> list[Example]:
    """``n`` (prompt, gold SQL) examples, deterministic in ``(seed, split)``.

    ``split`` only selects an independent random stream, so the same seed gives
    different questions in different splits, but every split draws from the same
    closed world: most questions of one split also occur in another. Held-out
    questions come from :func:`held_out_examples`.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return list(itertools.islice(_example_stream(seed, split, _schema_names(schemas)), n))


# The shipped models' training data, as (n, seed) of split "train": the embedded tiny-sql
# model's corpus (benchmarks/train_tiny_sql.py's defaults, recorded in its training.json)
# and the prompts tiny-sql-drafter was distilled on (assets/tiny-sql-drafter/training.json).
SHIPPED_TRAINING_SETS: tuple[tuple[int, int], ...] = ((20000, 0), (4000, 1000))

# How many examples in a row may be seen ones before held_out_examples gives up.
_MAX_SEEN_IN_A_ROW = 100_000


@functools.lru_cache(maxsize=4)
def seen_in_training(training_sets: tuple[tuple[int, int], ...] = SHIPPED_TRAINING_SETS
                     ) -> tuple[frozenset[str], frozenset[tuple[str, str]]]:
    """The prompts and the ``(schema, SQL)`` answers of train-split sets ``(n, seed)``.

    Cached: the embedded model's 20,000 training examples regenerate in about 0.1 s.
    """
    examples = [ex for n, seed in training_sets for ex in sql_examples(n, seed, split="train")]
    return frozenset(ex.prompt for ex in examples), frozenset((ex.schema, ex.sql) for ex in examples)


def is_held_out(ex: Example, training_sets: tuple[tuple[int, int], ...] = SHIPPED_TRAINING_SETS) -> bool:
    """Neither the question's prompt nor its SQL answer (for its schema) occurs in the training sets."""
    prompts, answers = seen_in_training(training_sets)
    return ex.prompt not in prompts and (ex.schema, ex.sql) not in answers


def held_out_examples(n: int, seed: int = 0, split: str = "eval",
                      training_sets: tuple[tuple[int, int], ...] = SHIPPED_TRAINING_SETS,
                      schemas: Optional[Sequence[str]] = None) -> list[Example]:
    """``n`` distinct examples of ``(seed, split)`` held out from the training sets (:func:`is_held_out`).

    The filter is an exact lookup, not a rule on (schema, template, value): the train
    split draws from the same closed world of 4 schemas and 15 templates, so about 3/4
    of any other split's questions are training questions, and no partition of that
    world separates the rest without changing the shipped corpus the models were
    trained on. Questions without free values ("How many singers are there?") are all
    in training and never held out.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    out: list[Example] = []
    prompts: set[str] = set()
    seen_in_a_row = 0
    for ex in _example_stream(seed, split, _schema_names(schemas)):
        if len(out) == n:
            break
        if ex.prompt in prompts or not is_held_out(ex, training_sets):
            seen_in_a_row += 1
            if seen_in_a_row > _MAX_SEEN_IN_A_ROW:
                raise ValueError(f"split {split!r} seed {seed} has no more than {len(out)} held-out questions")
            continue
        seen_in_a_row = 0
        prompts.add(ex.prompt)
        out.append(ex)
    return out


def sql_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct demo prompts (schema + question, ending in a newline) the embedded model answers in SQL.

    Held out (:func:`held_out_examples`, split "demo"): no demo question or its SQL is in
    the embedded model's or its shipped drafter's training data. ``sql_prompts(n, seed)``
    is a prefix of ``sql_prompts(m, seed)`` for ``n < m``.
    """
    return [ex.prompt for ex in held_out_examples(n, seed, split="demo")]
