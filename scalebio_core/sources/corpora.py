"""Embedded offline corpora, built deterministically by the package (no shipped data files).

Every builder takes a seed and draws from its own ``random.Random`` streams (never the global RNG),
one stream per source, so that e.g. changing the validation size leaves the training sources
unchanged. Records are Alpaca-style ``{"instruction", "input", "output"}`` dicts, or ``{"text"}``
for language modelling. Sources of real text: English from the standard library (``pydoc_data``
documentation topics and the Zen of Python); other languages use Unicode CLDR data shipped with
``babel`` (installed with jupyterlab) inside small built-in sentence templates.
"""

from __future__ import annotations

import codecs
import contextlib
import datetime
import functools
import inspect
import io
import json
import random
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import babel
from babel import Locale, dates, lists, numbers, units

Record = dict[str, str]


@dataclass
class Corpus:
    """Named training sources plus a validation (target) set."""

    sources: dict[str, list[Record]]
    validation: list[Record]
    description: str
    provenance: str
    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    test: list[Record] = field(default_factory=list)
    """A held-out test split, where the corpus cannot draw a fresh validation set (its text is
    finite); empty: `pipeline.heldout_records` draws one with another seed."""

    def __post_init__(self) -> None:
        self.sources = {k: self.sources[k] for k in sorted(self.sources)}

    def texts(self) -> Iterator[str]:
        """Every record (sources, then validation) as one plain string."""
        for recs in [*self.sources.values(), self.validation]:
            for r in recs:
                yield _record_text(r)

    def write(self, dirpath: str | Path) -> Path:
        """Write ``<source>.jsonl``, ``validation.jsonl`` and ``manifest.json``; return the dir."""
        out = Path(dirpath)
        out.mkdir(parents=True, exist_ok=True)
        for name, recs in [*self.sources.items(), ("validation", self.validation)]:
            lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in recs)
            (out / f"{name}.jsonl").write_bytes(lines.encode("utf-8"))
        manifest = {
            "name": self.name,
            "seed": self.params.get("seed"),
            "description": self.description,
            "provenance": self.provenance,
            "params": self.params,
            "stats": corpus_stats(self),
        }
        text = json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
        (out / "manifest.json").write_bytes(text.encode("utf-8"))
        return out


def _record_text(r: Record) -> str:
    if "text" in r:
        return r["text"]
    return "\n".join(x for x in (r["instruction"], r["input"], r["output"]) if x)


def corpus_stats(corpus: Corpus) -> dict[str, dict[str, int]]:
    """Records and characters per source, plus ``validation``."""
    parts = [*corpus.sources.items(), ("validation", corpus.validation)]
    return {
        k: {"records": len(v), "characters": sum(len(_record_text(r)) for r in v)} for k, v in parts
    }


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"scalebio:{seed}:{stream}")  # str seeds hash with sha512: stable


def _check_sizes(**sizes: int) -> None:
    bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or v < 0}
    if bad:
        raise ValueError(f"corpus sizes must be non-negative integers, got {bad}")


def _table(spec: str) -> dict[str, str]:
    return dict(p.split(":") for p in spec.split(","))


# ---------------------------------------------------------------- instruction tasks
NAMES = "Tom Sara Ben Lily Omar Mia Ravi Emma Leo Nora Sam Zoe Ali Eva Max Ivy".split()
ITEMS = "apples pens books marbles stickers cookies coins cards shells stamps balloons".split()
WORDS = (
    "apple river garden window music pencil orange planet forest butter candle dragon yellow "
    "winter summer market silver rocket island basket guitar coffee mirror ticket bridge "
    "castle turtle rabbit cookie pepper tomato banana puzzle camera doctor engine flower "
    "hammer jacket ladder monkey number pillow school spider stone table violin wallet zebra "
    "cloud light ocean paper queen sugar tiger water bottle kitten"
).split()
CAPITALS = _table(
    "France:Paris,Germany:Berlin,Italy:Rome,Spain:Madrid,Portugal:Lisbon,Japan:Tokyo,"
    "China:Beijing,India:New Delhi,Canada:Ottawa,Mexico:Mexico City,Brazil:Brasilia,"
    "Argentina:Buenos Aires,Egypt:Cairo,Kenya:Nairobi,Australia:Canberra,Russia:Moscow,"
    "Greece:Athens,Turkey:Ankara,Norway:Oslo,Sweden:Stockholm,Finland:Helsinki,Poland:Warsaw,"
    "Austria:Vienna,Ireland:Dublin,Peru:Lima,Chile:Santiago,Thailand:Bangkok,Vietnam:Hanoi,"
    "South Korea:Seoul,Netherlands:Amsterdam"
)
_PAIRS = _table(
    "hot:cold,big:small,fast:slow,happy:sad,light:dark,early:late,open:closed,full:empty,"
    "high:low,strong:weak,rich:poor,young:old,hard:soft,wet:dry,loud:quiet,long:short,"
    "thick:thin,push:pull,win:lose,buy:sell,first:last,give:take,begin:end,up:down,"
    "inside:outside,above:below,before:after,true:false,easy:difficult,clean:dirty,"
    "cheap:expensive,safe:dangerous,day:night,love:hate,friend:enemy,arrive:leave,"
    "remember:forget,accept:refuse,increase:decrease,always:never"
)
ANTONYMS = {**_PAIRS, **{v: k for k, v in _PAIRS.items()}}
# unit (plural), singular, target unit, factor
UNITS = [
    ("meters", "meter", "centimeters", 100),
    ("kilometers", "kilometer", "meters", 1000),
    ("hours", "hour", "minutes", 60),
    ("minutes", "minute", "seconds", 60),
    ("kilograms", "kilogram", "grams", 1000),
    ("days", "day", "hours", 24),
    ("weeks", "week", "days", 7),
    ("liters", "liter", "milliliters", 1000),
    ("yards", "yard", "feet", 3),
    ("feet", "foot", "inches", 12),
    ("dollars", "dollar", "cents", 100),
]

I_WORD = "Solve the word problem."
I_REVERSE = "Reverse the word."
I_SORT = "Sort the numbers in ascending order."
I_UPPER = "Convert the phrase to uppercase."
I_COUNT = "Count how many times the letter appears in the word."
I_NEXT = "Give the next number in the sequence."
I_CAPITAL = "What is the capital of the country?"
I_ANTONYM = "Give the antonym of the word."
I_UNITS = "Convert the quantity."

# A task draws (instruction, input, answer, rationale) from an RNG.
Example = tuple[str, str, str, str]


def _add(r: random.Random) -> Example:
    n, it, a, b = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 30), r.randint(2, 30)
    q = f"{n} has {a} {it} and buys {b} more. How many {it} does {n} have now?"
    why = f"{n} starts with {a} {it} and buys {b} more, so {a} + {b} = {a + b}."
    return I_WORD, q, str(a + b), why


def _subtract(r: random.Random) -> Example:
    n, it, b = r.choice(NAMES), r.choice(ITEMS), r.randint(1, 20)
    a = b + r.randint(1, 20)
    q = f"{n} has {a} {it} and gives {b} to a friend. How many {it} are left?"
    why = f"{n} starts with {a} {it} and gives away {b}, so {a} - {b} = {a - b}."
    return I_WORD, q, str(a - b), why


def _multiply(r: random.Random) -> Example:
    n, it, a, b = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 9), r.randint(2, 12)
    q = f"{n} buys {a} bags with {b} {it} in each bag. How many {it} is that in total?"
    return I_WORD, q, str(a * b), f"There are {a} bags with {b} {it} each, so {a} * {b} = {a * b}."


def _divide(r: random.Random) -> Example:
    n, it, a, b = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 12), r.randint(2, 9)
    q = f"{n} shares {a * b} {it} equally among {b} friends. How many {it} does each friend get?"
    why = f"Sharing {a * b} {it} among {b} friends gives {a * b} / {b} = {a} each."
    return I_WORD, q, str(a), why


def _reverse(r: random.Random) -> Example:
    w = r.choice(WORDS)
    why = f'Reading "{w}" from the last letter to the first gives "{w[::-1]}".'
    return I_REVERSE, w, w[::-1], why


def _sort(r: random.Random) -> Example:
    xs = r.sample(range(1, 100), r.randint(4, 6))
    inp, out = ", ".join(map(str, xs)), ", ".join(map(str, sorted(xs)))
    return I_SORT, inp, out, f"Ordering {inp} from smallest to largest gives {out}."


def _upper(r: random.Random) -> Example:
    p = " ".join(r.sample(WORDS, r.randint(2, 3)))
    return I_UPPER, p, p.upper(), f'Writing every letter of "{p}" as a capital gives "{p.upper()}".'


def _count(r: random.Random) -> Example:
    w = r.choice(WORDS)
    c = r.choice(w) if r.random() < 0.8 else r.choice("abcdefghijklmnopqrstuvwxyz")
    k = w.count(c)
    why = f'The letter "{c}" appears {k} time{"" if k == 1 else "s"} in "{w}".'
    return I_COUNT, f"Letter: {c}\nWord: {w}", str(k), why


def _next(r: random.Random) -> Example:
    if r.random() < 0.7:
        d, x0 = r.randint(2, 9), r.randint(1, 20)
        xs = [x0 + d * i for i in range(4)]
        why = f"Each term adds {d}, so the next term is {xs[-1]} + {d} = {xs[-1] + d}."
        nxt = xs[-1] + d
    else:
        q, x0 = r.choice((2, 3)), r.randint(1, 5)
        xs = [x0 * q**i for i in range(4)]
        nxt = xs[-1] * q
        why = f"Each term is multiplied by {q}, so the next term is {xs[-1]} * {q} = {nxt}."
    return I_NEXT, ", ".join(map(str, xs)), str(nxt), why


def _capital(r: random.Random) -> Example:
    c = r.choice(sorted(CAPITALS))
    return I_CAPITAL, c, CAPITALS[c], f"The capital of {c} is {CAPITALS[c]}."


def _antonym(r: random.Random) -> Example:
    w = r.choice(sorted(ANTONYMS))
    return I_ANTONYM, w, ANTONYMS[w], f'The opposite of "{w}" is "{ANTONYMS[w]}".'


def _units(r: random.Random) -> Example:
    src, one, dst, f = r.choice(UNITS)
    k = r.randint(2, 12)
    out = f"{k * f} {dst}"
    return I_UNITS, f"{k} {src} to {dst}", out, f"One {one} is {f} {dst}, so {k} * {f} = {k * f}."


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "add": _add,
    "antonym": _antonym,
    "capital": _capital,
    "count_letter": _count,
    "divide": _divide,
    "multiply": _multiply,
    "next_number": _next,
    "reverse_word": _reverse,
    "sort_numbers": _sort,
    "subtract": _subtract,
    "unit_conversion": _units,
    "uppercase": _upper,
}


def reference_answer(record: Record) -> str:
    """The correct terse answer of an instruction-task record, recomputed from its input."""
    ins, x = record["instruction"], record["input"]
    nums = [int(t) for t in re.findall(r"\d+", x)]
    if ins == I_WORD:
        a, b = nums[0], nums[1]
        if " bags with " in x:
            return str(a * b)
        if " shares " in x:
            return str(a // b)
        return str(a + b if " buys " in x else a - b)
    if ins == I_REVERSE:
        return x[::-1]
    if ins == I_SORT:
        return ", ".join(map(str, sorted(nums)))
    if ins == I_UPPER:
        return x.upper()
    if ins == I_COUNT:
        c, w = re.fullmatch(r"Letter: (.)\nWord: (\w+)", x).groups()
        return str(w.count(c))
    if ins == I_NEXT:
        if nums[1] - nums[0] == nums[2] - nums[1] == nums[3] - nums[2]:
            return str(nums[-1] + nums[1] - nums[0])
        return str(nums[-1] * (nums[1] // nums[0]))
    if ins == I_CAPITAL:
        return CAPITALS[x]
    if ins == I_ANTONYM:
        return ANTONYMS[x]
    if ins == I_UNITS:
        k, src, _, dst = x.split()
        return f"{int(k) * next(f for s, _, _, f in UNITS if s == src)} {dst}"
    raise ValueError(f"not an instruction-task record: {ins!r}")


def extract_answer(text: str) -> str:
    """The answer in a worked output ("... The answer is N.", or the last \\boxed{N}); else the
    stripped text."""
    m = re.search(r"The answer is (.+?)\.?\s*$", text)
    if m:
        return m.group(1)
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return boxed[-1].strip() if boxed else text.strip()


def _draw(r: random.Random, task: str, detailed: bool = False) -> Record:
    ins, x, ans, why = TASKS[task](r)
    return {
        "instruction": ins,
        "input": x,
        "output": f"{why} The answer is {ans}." if detailed else ans,
    }


def _repeat(r: random.Random, n: int, draw: Callable[[random.Random], Record]) -> list[Record]:
    """`n` records drawn one after another from one RNG stream (a fresh RNG per record would
    repeat the first record `n` times)."""
    return [draw(r) for _ in range(n)]


def _mixed(r: random.Random, n: int, detailed: bool = False) -> list[Record]:
    names = sorted(TASKS)
    return [_draw(r, r.choice(names), detailed) for _ in range(n)]


_PROV_TASKS = "templated by scalebio_core.sources.corpora from built-in word lists and tables"


def instruction_tasks(n_per_task: int = 200, seed: int = 0, n_val: int = 200) -> Corpus:
    """One source per templated task (12 tasks); every output is checkable with `solve`."""
    _check_sizes(n_per_task=n_per_task, n_val=n_val)
    src = {t: _repeat(_rng(seed, t), n_per_task, lambda r, t=t: _draw(r, t)) for t in TASKS}
    return Corpus(
        src,
        _mixed(_rng(seed, "validation"), n_val),
        "Templated instruction tasks with exact answers, one source per task; "
        "validation mixes all tasks.",
        _PROV_TASKS,
        "instruction",
        {"n_per_task": n_per_task, "n_val": n_val, "seed": seed},
    )


def noise_rate(name: str) -> float:
    """The corruption rate in a source name of the noisy corpus, such as 'noise_0.4'."""
    return float(name.rsplit("_", 1)[-1])


def _noise_name(rate: float) -> str:
    return f"noise_{rate:.1f}" if round(rate, 1) == rate else f"noise_{rate}"


def _corrupt(r: random.Random, out: str, pool: list[str]) -> str:
    if r.random() < 0.5 and len(out) > 1:
        chars = list(out)
        r.shuffle(chars)
        if "".join(chars) != out:
            return "".join(chars)
    others = [p for p in pool if p != out]
    return r.choice(others) if others else out + "0"


def noisy_sources(
    noise_rates: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    n_per_source: int = 500,
    n_val: int = 200,
    seed: int = 0,
) -> Corpus:
    """One source per noise rate; exactly ``round(rate * n)`` outputs are wrong answers."""
    _check_sizes(n_per_source=n_per_source, n_val=n_val)
    names = [_noise_name(float(x)) for x in noise_rates]
    if len(set(names)) != len(names) or not all(0.0 <= x <= 1.0 for x in noise_rates):
        raise ValueError(f"noise_rates must be distinct values in [0, 1], got {noise_rates}")
    src = {}
    for rate, name in zip(noise_rates, names, strict=True):
        r = _rng(seed, name)
        recs = _mixed(r, n_per_source)
        pool = [x["output"] for x in recs]
        for i in sorted(r.sample(range(n_per_source), round(rate * n_per_source))):
            recs[i]["output"] = _corrupt(r, recs[i]["output"], pool)
        src[name] = recs
    return Corpus(
        src,
        _mixed(_rng(seed, "validation"), n_val),
        "Same task mixture per source; a fraction (the rate) of each source's outputs "
        "replaced by a shuffled answer or another record's answer; clean validation.",
        _PROV_TASKS,
        "noisy",
        {
            "noise_rates": list(noise_rates),
            "n_per_source": n_per_source,
            "n_val": n_val,
            "seed": seed,
        },
    )


def informative_sources(
    n_terse: int = 900, n_detailed: int = 100, n_val: int = 200, seed: int = 0
) -> Corpus:
    """A large terse-answer source beside a small worked-explanation source (Alpaca vs GPT-4)."""
    _check_sizes(n_terse=n_terse, n_detailed=n_detailed, n_val=n_val)
    src = {
        "terse": _mixed(_rng(seed, "terse"), n_terse),
        "detailed": _mixed(_rng(seed, "detailed"), n_detailed, detailed=True),
    }
    return Corpus(
        src,
        _mixed(_rng(seed, "validation"), n_val, detailed=True),
        "Same tasks answered tersely (large source) or with a worked explanation "
        "ending 'The answer is X.' (small source); validation in the detailed style.",
        _PROV_TASKS,
        "informative",
        {"n_terse": n_terse, "n_detailed": n_detailed, "n_val": n_val, "seed": seed},
    )


# ---------------------------------------------------------------- a planted mixture
PLANTED_STYLES: dict[str, dict[str, Callable[[str], str]]] = {
    # one label token before the same answer: the sources differ in nothing else
    "labels": {f"label_{c}": (lambda a, c=c: f"{c.upper()}: {a}") for c in "abcd"},
    # four answer formats of different lengths
    "formats": {
        "bare": lambda a: a,
        "sentence": lambda a: f"The answer is {a}.",
        "tagged": lambda a: f"Answer: {a}",
        "json": lambda a: json.dumps({"answer": a}, ensure_ascii=False),
    },
}
"""The answer styles of `planted_mixture`, one training source each, in the order of its
`mixture`: "labels" writes "A: 42", "B: 42", "C: 42", "D: 42" (one token of the embedded
tokenizer each, then the same answer), "formats" writes "42", "The answer is 42.", "Answer: 42"
and '{"answer": "42"}'."""


def _planted_styles(r: random.Random, n: int, names: list[str], mixture: tuple) -> list[str]:
    """`n` style names in exact proportions `mixture` (largest remainders), shuffled."""
    raw = [q * n for q in mixture]
    counts = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: n - sum(counts)]:
        counts[i] += 1
    styles = [name for name, c in zip(names, counts, strict=True) for _ in range(c)]
    r.shuffle(styles)
    return styles


def planted_mixture(
    mixture: tuple[float, ...] = (0.5, 0.3, 0.2, 0.0),
    n_per_source: int = 500,
    n_val: int = 200,
    seed: int = 0,
    styles: str = "labels",
    shared_prompts: bool = True,
) -> Corpus:
    """Four sources that answer the same instruction records in four styles (`PLANTED_STYLES`);
    the validation set is drawn from the *known* mixture `mixture` of the styles (in their
    order), in exact proportions.

    The prompt never says which style to use, so a model trained on the mixture p answers in
    style s with probability p_s, and the target loss is lowest when p is the planted mixture:
    the right weights are known and, for a mixture such as the default, interior, with a fourth
    source the target does not contain. No validation prompt is a prompt of the sources.

    `shared_prompts`: every source answers the same records, so a model cannot tell the sources
    apart by the prompt. With a set of prompts per source (False) a model learns, within a few
    epochs, which prompt carries which style; its answers then no longer follow p, and the
    weights lose their signal (notebook 10 shows it).
    """
    _check_sizes(n_per_source=n_per_source, n_val=n_val)
    if styles not in PLANTED_STYLES:
        raise ValueError(f"styles must be one of {sorted(PLANTED_STYLES)}, got {styles!r}")
    table = PLANTED_STYLES[styles]
    mix = tuple(float(x) for x in mixture)
    if len(mix) != len(table) or min(mix) < 0 or abs(sum(mix) - 1) > 1e-9:
        raise ValueError(
            f"mixture must give {len(table)} weights >= 0 summing to 1, in the order "
            f"{', '.join(table)}; got {mixture}"
        )
    src = {}
    for name, style in table.items():
        # shared: the same records in every source (`shared_prompts`, see the docstring)
        stream = "planted" if shared_prompts else f"planted_{name}"
        recs = _mixed(_rng(seed, stream), n_per_source)
        src[name] = [{**x, "output": style(x["output"])} for x in recs]
    rv = _rng(seed, "validation")
    seen = {(x["instruction"], x["input"]) for recs in src.values() for x in recs}
    val: list[Record] = []
    for _ in range(50 * n_val):  # prompts the sources do not hold (no record reaches training)
        x = _draw(rv, rv.choice(sorted(TASKS)))
        if (x["instruction"], x["input"]) not in seen:
            seen.add((x["instruction"], x["input"]))
            val.append(x)
            if len(val) == n_val:
                break
    if len(val) < n_val:
        raise ValueError(f"cannot draw {n_val} validation prompts apart from the sources'")
    drawn = _planted_styles(rv, n_val, list(table), mix)
    val = [{**x, "output": table[s](x["output"])} for x, s in zip(val, drawn, strict=True)]
    return Corpus(
        src,
        val,
        "The same instruction tasks answered in four styles, one source per style; validation "
        "drawn from a known mixture of the styles "
        + ", ".join(f"{n} {q:g}" for n, q in zip(table, mix, strict=True))
        + ".",
        _PROV_TASKS,
        "planted",
        {
            "mixture": list(mix),
            "n_per_source": n_per_source,
            "n_val": n_val,
            "seed": seed,
            "styles": styles,
            "shared_prompts": shared_prompts,
        },
    )


def planted_weights(mixture: Sequence[float], styles: str = "labels") -> dict[str, float]:
    """The planted mixture as weights by source name (the right answer of `planted_mixture`)."""
    return dict(zip(PLANTED_STYLES[styles], (float(x) for x in mixture), strict=True))


# ---------------------------------------------------------------- math word problems
def _math_problem(r: random.Random, steps: int) -> Record:
    n, it, have = r.choice(NAMES), r.choice(ITEMS), r.randint(3, 30)
    q, cot = [f"{n} has {have} {it}."], [f"{n} starts with {have} {it}."]
    for _ in range(steps):
        kind = r.choice(("buy", "give", "bags") if have > 1 else ("buy", "bags"))
        if kind == "buy":
            b = r.randint(2, 20)
            q.append(f"Then {n} buys {b} more.")
            cot.append(f"After buying {b} more, {n} has {have} + {b} = {have + b}.")
            have += b
        elif kind == "give":
            b = r.randint(1, have - 1)
            q.append(f"Then {n} gives {b} away.")
            cot.append(f"After giving {b} away, {n} has {have} - {b} = {have - b}.")
            have -= b
        else:
            k, m = r.randint(2, 5), r.randint(2, 10)
            q.append(f"Then {n} buys {k} bags with {m} {it} in each bag.")
            cot.append(
                f"The bags hold {k} * {m} = {k * m} {it}, so {n} has "
                f"{have} + {k * m} = {have + k * m}."
            )
            have += k * m
    q.append(f"How many {it} does {n} have now?")
    return {
        "instruction": "Solve the math word problem. Show your reasoning.",
        "input": " ".join(q),
        "output": " ".join(cot) + f" The answer is {have}.",
    }


def math_word_problems(
    n: int = 500,
    seed: int = 0,
    n_val: int = 200,
    val_steps: tuple[int, ...] = (1, 2, 3),
    extra_tasks: tuple[str, ...] = (),
) -> Corpus:
    """Arithmetic word problems with chain-of-thought answers, one source per step count;
    `extra_tasks` adds one source of `n` terse instruction-task records per named task (the
    analogue of general instruction data beside the math sources)."""
    _check_sizes(n=n, n_val=n_val)
    if not val_steps or not set(val_steps) <= {1, 2, 3}:
        raise ValueError(f"val_steps must be a non-empty subset of (1, 2, 3), got {val_steps}")
    unknown = sorted(set(extra_tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown extra_tasks {unknown}; known tasks: {sorted(TASKS)}")
    src = {
        f"steps_{k}": _repeat(_rng(seed, f"steps_{k}"), n, lambda r, k=k: _math_problem(r, k))
        for k in (1, 2, 3)
    }
    src.update(
        {f"task_{t}": _repeat(_rng(seed, t), n, lambda r, t=t: _draw(r, t)) for t in extra_tasks}
    )
    rv = _rng(seed, "validation")
    val = [_math_problem(rv, rv.choice(val_steps)) for _ in range(n_val)]
    return Corpus(
        src,
        val,
        "Multi-step arithmetic word problems (GSM8K analogue) whose outputs "
        "reason step by step and end 'The answer is N.'"
        + (", beside terse instruction tasks" if extra_tasks else ""),
        _PROV_TASKS,
        "math",
        {
            "n": n,
            "n_val": n_val,
            "val_steps": list(val_steps),
            "seed": seed,
            **({"extra_tasks": list(extra_tasks)} if extra_tasks else {}),
        },
    )


# ---------------------------------------------------------------- multilingual text
def _english_paragraphs() -> list[str]:
    try:  # lazy: stripped Python builds leave pydoc_data out
        from pydoc_data.topics import topics

        docs = [topics[k] for k in sorted(topics)]
    except ImportError:  # pragma: no cover - stripped Python builds
        docs = [inspect.getdoc(m) or "" for m in (json, random, re, codecs, contextlib)]
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # lazy: importing it prints the Zen of Python (silenced here)
    paras = [codecs.decode(this.s, "rot13").split("\n\n", 1)[1].replace("\n", " ")]
    for doc in docs:
        for p in re.split(r"\n\s*\n", doc):
            if re.search(r"::=|\*\*\*|===|>>>|\.\.\.|---|\+\+|\|", p):
                continue  # grammar, tables, doctests
            text = re.sub(r"^(\*|\d+\.) ", "", " ".join(p.split()))  # list items
            letters = sum(c.isalpha() or c == " " for c in text)
            if re.match(r"[A-Z]", text) and text.endswith(".") and letters > 0.85 * len(text):
                paras.append(text)
    return list(dict.fromkeys(paras))  # topics repeat some paragraphs


def _english_pairs() -> list[list[tuple[str, str]]]:
    """Per paragraph of real English prose: (text, continuation) pairs of consecutive sentences,
    or the two halves of a single long sentence."""
    out = []
    for p in _english_paragraphs():
        s = re.split(r"(?<!e\.g\.)(?<!i\.e\.)(?<=[.!?])\s+(?=[A-Z])", p)
        s = [x for x in s if 15 <= len(x) <= 250]
        pairs = [(s[i], s[i + 1]) for i in range(len(s) - 1)]
        if not pairs and len(s) == 1 and len(w := s[0].split()) >= 12:
            pairs = [(" ".join(w[: len(w) // 2]), " ".join(w[len(w) // 2 :]))]
        if pairs:
            out.append(pairs)
    return out


CITIES = (
    "Europe/London Europe/Paris Europe/Berlin Europe/Rome Europe/Madrid Europe/Vienna "
    "Europe/Lisbon Europe/Athens Europe/Moscow Europe/Warsaw Europe/Prague Europe/Brussels "
    "Europe/Amsterdam Europe/Stockholm Europe/Copenhagen Europe/Dublin Europe/Zurich "
    "Asia/Tokyo Asia/Shanghai Asia/Seoul Asia/Singapore America/New_York America/Chicago "
    "America/Los_Angeles America/Toronto America/Mexico_City America/Sao_Paulo "
    "Australia/Sydney"
).split()
COUNTRIES = "FR DE JP BR CA MX EG AU CN KR SE NO PT GR AR KE TR PE CL NZ".split()
LANG_CODES = "en fr de es it pt nl ja zh ru ar sv pl el ko tr".split()
# language -> (babel locale, currency, first names, sentence templates)
LANGUAGES: dict[str, tuple[str, str, str, list[str]]] = {
    "french": (
        "fr",
        "EUR",
        "Marie Pierre Camille Louis Claire Julien",
        [
            "{name} part pour {city} le {day}.",
            "{name} parle {lang} et apprend {lang2}.",
            "En {month}, {name} visite {city}.",
            "Le rendez-vous est prévu le {date}.",
            "Le billet coûte {money}.",
            "Le trajet dure {hours}.",
            "Le colis pèse {kg}.",
            "La gare est à {km} d'ici.",
            "Pays visités : {countries}.",
            "La ville compte {number} habitants.",
        ],
    ),
    "german": (
        "de",
        "EUR",
        "Anna Lukas Lena Jonas Sophie Felix",
        [
            "{name} fährt am {day} nach {city}.",
            "{name} spricht {lang} und lernt {lang2}.",
            "Im {month} besucht {name} {city}.",
            "Der Termin ist am {date}.",
            "Die Fahrkarte kostet {money}.",
            "Die Fahrt dauert {hours}.",
            "Das Paket wiegt {kg}.",
            "Der Bahnhof ist {km} entfernt.",
            "Besuchte Länder: {countries}.",
            "Die Stadt hat {number} Einwohner.",
        ],
    ),
    "spanish": (
        "es",
        "EUR",
        "Lucía Pablo Carmen Javier Elena Diego",
        [
            "{name} viaja a {city} el {day}.",
            "{name} habla {lang} y estudia {lang2}.",
            "En {month}, {name} visita {city}.",
            "La cita es el {date}.",
            "El billete cuesta {money}.",
            "El viaje dura {hours}.",
            "El paquete pesa {kg}.",
            "La estación está a {km} de aquí.",
            "Países visitados: {countries}.",
            "La ciudad tiene {number} habitantes.",
        ],
    ),
    "italian": (
        "it",
        "EUR",
        "Giulia Marco Chiara Luca Sara Matteo",
        [
            "{name} parte per {city} {day}.",
            "{name} parla {lang} e studia {lang2}.",
            "Nel mese di {month}, {name} visita {city}.",
            "L'appuntamento è fissato per {date}.",
            "Il biglietto costa {money}.",
            "Il viaggio dura {hours}.",
            "Il pacco pesa {kg}.",
            "La stazione è a {km} da qui.",
            "Paesi visitati: {countries}.",
            "La città ha {number} abitanti.",
        ],
    ),
    "chinese": (
        "zh",
        "CNY",
        "小明 李华 王芳 张伟 刘洋 陈静",
        [
            "{name}{day}去{city}。",
            "{name}会说{lang}，也在学{lang2}。",
            "{month}，{name}参观了{city}。",
            "约会定在{date}。",
            "票价是{money}。",
            "旅程需要{hours}。",
            "包裹重{kg}。",
            "车站离这里{km}。",
            "去过的国家：{countries}。",
            "这座城市有{number}名居民。",
        ],
    ),
}


def _sentence_maker(language: str) -> Callable[[random.Random], list[str]]:
    loc, cur, names, templates = LANGUAGES[language]
    L = Locale.parse(loc)
    root = {tz: None if loc == "zh" else tz.split("/")[1].replace("_", " ") for tz in CITIES}
    cities = [c for tz in CITIES if (c := L.time_zones.get(tz, {}).get("city") or root[tz])]
    days = [L.days["format"]["wide"][i] for i in range(7)]
    months = [L.months["format"]["wide"][i] for i in range(1, 13)]

    def unit(r: random.Random, u: str) -> str:
        return units.format_unit(r.randint(1, 12), u, length="long", locale=loc)

    def date(r: random.Random) -> str:
        d = datetime.date(r.randint(2000, 2030), r.randint(1, 12), r.randint(1, 28))
        return dates.format_date(d, "full", locale=loc)

    fields: dict[str, Callable[[random.Random], str]] = {
        "city": lambda r: r.choice(cities),
        "day": lambda r: r.choice(days),
        "month": lambda r: r.choice(months),
        "lang": lambda r: L.languages[r.choice(LANG_CODES)],
        "date": date,
        "money": lambda r: numbers.format_currency(r.randint(100, 20000) / 100, cur, locale=loc),
        "hours": lambda r: unit(r, "duration-hour"),
        "kg": lambda r: unit(r, "mass-kilogram"),
        "km": lambda r: unit(r, "length-kilometer"),
        "countries": lambda r: lists.format_list(
            [L.territories[c] for c in r.sample(COUNTRIES, r.randint(2, 4))], locale=loc
        ),
        "number": lambda r: numbers.format_decimal(r.randint(10_000, 5_000_000), locale=loc),
    }

    def make(r: random.Random, k: int = 3) -> list[str]:
        """k sentences from distinct templates about one person."""
        name, out = r.choice(names.split()), []
        for t in r.sample(templates, k):
            v = {f: g(r) for f, g in fields.items() if "{" + f + "}" in t and f != "name"}
            if "{lang2}" in t:  # a second, different language
                v["lang"], v["lang2"] = (L.languages[c] for c in r.sample(LANG_CODES, 2))
            out.append(t.format(name=name, **v))
        return out

    return make


def _pair_record(first: str, second: str, fmt: str, sep: str = " ") -> Record:
    if fmt == "text":
        return {"text": first + sep + second}
    return {"instruction": "Continue the text.", "input": first, "output": second}


def multilingual_templates(
    n_per_source: int = 500, n_val: int = 200, seed: int = 0, fmt: str = "instruction"
) -> Corpus:
    """Real English prose beside CLDR-templated French, German, Spanish, Italian and Chinese: the
    multilingual training text of the embedded tokenizer (`tokenizer.TRAINING_CORPORA`), kept so
    that the tokenizer stays the same. Its languages also differ in domain (English is Python
    documentation, the rest template sentences); notebook 04 uses `multilingual_sources`.

    ``fmt="instruction"`` gives "Continue the text." records (input = first part, output = the
    continuation); ``fmt="text"`` gives ``{"text"}`` records. Validation: English sentence pairs
    from held-out paragraphs (no sentence shared with training). English training pairs are drawn
    without replacement while the pool lasts (~900 pairs at n_val=200), with replacement beyond.
    The non-English text is synthetic: built-in sentence templates filled with real localized
    words (cities, countries, languages, days, months, dates, numbers, units) from CLDR via babel.
    """
    if fmt not in ("instruction", "text"):
        raise ValueError(f"fmt must be 'instruction' or 'text', got {fmt!r}")
    _check_sizes(n_per_source=n_per_source, n_val=n_val)
    paras = _english_pairs()  # split by paragraph: no sentence is both trained on and validated
    _rng(seed, "english-split").shuffle(paras)
    val, pool, seen = [], [], set()
    for pairs in paras:
        if len(val) < n_val:
            val.extend(pairs)
            seen.update(s for pair in pairs for s in pair)
        else:
            pool.extend(p for p in pairs if not seen.intersection(p))
    val = val[:n_val]
    if not pool:
        raise ValueError(f"n_val={n_val} leaves no English training text")
    rs = _rng(seed, "english")
    picks = (
        rs.sample(pool, n_per_source)
        if n_per_source <= len(pool)
        else rs.choices(pool, k=n_per_source)
    )
    src = {"english": [_pair_record(a, b, fmt) for a, b in picks]}
    for lang in LANGUAGES:
        r, make, sep = _rng(seed, lang), _sentence_maker(lang), "" if lang == "chinese" else " "
        recs = []
        for _ in range(n_per_source):
            s = make(r)
            recs.append(_pair_record(sep.join(s[:2]), s[2], fmt, sep))
        src[lang] = recs
    prov = (
        f"English: Python {sys.version.split()[0]} standard library (pydoc_data.topics "
        f"documentation, the Zen of Python); other languages: Unicode CLDR data from babel "
        f"{babel.__version__} in built-in sentence templates"
    )
    return Corpus(
        src,
        [_pair_record(a, b, fmt) for a, b in val],
        "Text continuation in six languages; the target (validation) is held-out real English.",
        prov,
        "multilingual_templates",
        {"n_per_source": n_per_source, "n_val": n_val, "seed": seed, "fmt": fmt},
    )


# ---------------------------------------------------------------- parallel text: message catalogs
# The languages of the multilingual corpus and their gettext codes in Django's catalogs.
CATALOG_LANGUAGES = {
    "french": "fr",
    "german": "de",
    "spanish": "es",
    "italian": "it",
    "chinese": "zh_Hans",
}
NO_SPACES = ("chinese",)  # split by characters, joined without a space
MIN_WORDS = 2  # of the English message: a message of one word cannot be continued


def _django_root() -> Path:
    import importlib.util  # lazy: only this corpus needs the package's location

    spec = importlib.util.find_spec("django")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the multilingual corpus reads the translated message catalogs that Django ships "
            "(django/**/locale/*/LC_MESSAGES/django.po); install it: pip install "
            "'scalebio_core[demo]' (django 5.2)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=4)
def catalog_messages(languages: tuple[str, ...]) -> tuple[dict[str, str], ...]:
    """The interface messages that Django's catalogs translate into every one of `languages`
    (keys of `CATALOG_LANGUAGES`): one dict per message, {"english": msgid, language: msgstr}.

    Only non-fuzzy translations (the singular form of a plural message) that differ from the
    English, where the English and the translation both have `MIN_WORDS` words (characters in
    Chinese) so that each can be split into a start and a continuation; a message that several
    catalogs hold is kept once (by its English text), so no string is both trained on and
    validated. Sorted by the English text.
    """
    from babel.messages.pofile import read_po  # lazy: only this corpus parses catalogs

    root = _django_root()
    found: dict[str, dict[str, dict[str, str]]] = {}  # english -> catalog -> {language: text}
    for lang in languages:
        code = CATALOG_LANGUAGES[lang]
        for path in sorted(root.glob(f"**/locale/{code}/LC_MESSAGES/django.po")):
            where = str(path.relative_to(root)).split("/locale/")[0]
            with path.open("rb") as f, contextlib.redirect_stdout(io.StringIO()):
                catalog = read_po(f)  # babel prints warnings about some catalogs' plural forms
            for m in catalog:
                if m.fuzzy or not m.id:
                    continue
                # a plural message: its singular form, e.g. "%(count)s item was changed"
                english, text = (
                    (m.id[0], m.string[0]) if isinstance(m.id, tuple) else (m.id, m.string)
                )
                text = " ".join((text or "").split())
                if _splittable(english, "english") and _splittable(text, lang) and text != english:
                    found.setdefault(english, {}).setdefault(f"{where}|{m.context}", {})[lang] = (
                        text
                    )
    out = []
    for english in sorted(found):
        for texts in found[english].values():  # the first catalog that has every language
            if set(texts) == set(languages):
                out.append({"english": " ".join(english.split()), **texts})
                break
    return tuple(out)


def _splittable(text: str, language: str) -> bool:
    """Whether a message has `MIN_WORDS` words (characters, in a language without spaces)."""
    return len(text if language in NO_SPACES else text.split()) >= MIN_WORDS


def _split_message(text: str, language: str) -> tuple[str, str]:
    """The first third of a message (words, or characters where words have no spaces) and the
    rest."""
    if language in NO_SPACES:
        k = max(1, len(text) // 3)
        return text[:k], text[k:]
    words = text.split()
    k = max(1, len(words) // 3)
    return " ".join(words[:k]), " ".join(words[k:])


def multilingual_sources(
    n_per_source: int = 400,
    n_val: int = 120,
    seed: int = 0,
    fmt: str = "instruction",
    languages: Sequence[str] = tuple(CATALOG_LANGUAGES),
    n_test: int | None = None,
) -> Corpus:
    """Parallel text: the same interface messages in English and in `languages`, one source per
    language, from the translated message catalogs that Django ships (read at build time).

    Every record continues a message: input = its first third, output = the rest
    (``fmt="text"``: the whole message). Every source holds the same draw of messages, each in
    its own language, so the sources differ in language only. Validation, and a test split of
    `n_test` (default `n_val`) more: English messages that no source holds in any language.
    Draws are without replacement while the pool lasts, with replacement beyond.
    """
    if fmt not in ("instruction", "text"):
        raise ValueError(f"fmt must be 'instruction' or 'text', got {fmt!r}")
    n_test = n_val if n_test is None else n_test
    _check_sizes(n_per_source=n_per_source, n_val=n_val, n_test=n_test)
    unknown = sorted(set(languages) - set(CATALOG_LANGUAGES))
    if unknown:
        raise ValueError(f"unknown languages {unknown}; known: {sorted(CATALOG_LANGUAGES)}")
    messages = list(catalog_messages(tuple(languages)))
    _rng(seed, "catalog-split").shuffle(messages)
    val, test = messages[:n_val], messages[n_val : n_val + n_test]
    pool = messages[n_val + n_test :]
    if not pool:
        raise ValueError(
            f"n_val={n_val}, n_test={n_test}: the catalogs hold {len(messages)} messages in every "
            f"language asked for, so n_val + n_test must stay below {len(messages)}"
        )
    r = _rng(seed, "catalog-draw")
    many = n_per_source > len(pool)
    picks = r.choices(pool, k=n_per_source) if many else r.sample(pool, n_per_source)

    def record(text: str, language: str) -> Record:
        sep = "" if language in NO_SPACES else " "
        return _pair_record(*_split_message(text, language), fmt, sep)

    src = {lang: [record(m[lang], lang) for m in picks] for lang in ("english", *languages)}
    from importlib.metadata import version  # lazy: only for the provenance

    prov = (
        f"Django {version('django')} message catalogs (django/**/locale/<language>/LC_MESSAGES/"
        f"django.po), read from the installed package: {len(messages)} messages translated into "
        f"every language: {len(pool)} for training, {len(val)} held out for validation, "
        f"{len(test)} for the test"
    )
    return Corpus(
        src,
        [record(m["english"], "english") for m in val],
        "The same interface messages in six languages (parallel text); the target is held-out "
        "English messages.",
        prov,
        "multilingual",
        {
            "n_per_source": n_per_source,
            "n_val": n_val,
            "n_test": n_test,
            "seed": seed,
            "fmt": fmt,
            "languages": list(languages),
        },
        [record(m["english"], "english") for m in test],
    )


CORPORA: dict[str, Callable[..., Corpus]] = {
    "instruction": instruction_tasks,
    "noisy": noisy_sources,
    "multilingual": multilingual_sources,
    "multilingual_templates": multilingual_templates,
    "informative": informative_sources,
    "math": math_word_problems,
    "planted": planted_mixture,
}


def build_corpus(name: str, **kwargs: Any) -> Corpus:
    """Build a registered corpus by name (see `CORPORA`)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known: {', '.join(sorted(CORPORA))}")
    return CORPORA[name](**kwargs)
