"""A deterministic generator of English-like text: the default corpus, since nothing may be
downloaded.

The text is a small world with a vocabulary of a few hundred words: short stories with recurring
characters, character profiles, simple facts, dialogues, and grammar sentences. The characters
and facts are fixed (they do not depend on the seed), so the same statements recur across the
corpus ("Mia has a dog named Max") and a ~10M-parameter model can learn them in minutes; the
seed only varies which documents are drawn. Pure Python, about 2 MB of text per second or better.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from deploykit.data.tasks import task_documents
from deploykit.errors import ConfigError

DEFAULT_N_CHARS = 2_000_000

# ---- vocabulary -----------------------------------------------------------------------------------

_NAMES_F = ("Mia", "Lily", "Emma", "Zoe", "Anna", "Ruby", "Sara", "Nora", "Ella", "Lucy", "Ivy", "Rose")
_NAMES_M = ("Tom", "Ben", "Sam", "Leo", "Max", "Jack", "Noah", "Finn", "Owen", "Luke", "Eli", "Hugo")
_PET_KINDS = ("dog", "cat", "bird", "rabbit", "fish", "turtle", "frog", "hamster")
_PET_NAMES = ("Spot", "Luna", "Pip", "Coco", "Biscuit", "Sunny", "Shadow", "Pepper", "Milo", "Daisy",
              "Bean", "Ziggy", "Mochi", "Rusty", "Olive", "Bubbles")
_COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "white", "black", "brown")
_TOWNS = ("Oakridge", "Riverton", "Maple Hill", "Stonebrook", "Pinewood", "Sunvale", "Lakeside",
          "Fairport")
_JOBS = ("teacher", "baker", "doctor", "farmer", "painter", "builder", "nurse", "pilot", "cook",
         "singer", "driver", "gardener")
_FOODS = ("apples", "bread", "soup", "cake", "rice", "carrots", "cheese", "pears", "eggs", "pasta",
          "cookies", "grapes", "beans", "pie", "honey", "milk")
_PLACES = ("the park", "the market", "the river", "the school", "the library", "the beach",
           "the forest", "the farm", "the bakery", "the garden", "the hill", "the zoo", "the lake",
           "the station", "the museum", "the shop")
_TIMES = ("In the morning", "After lunch", "In the evening", "On Monday", "On Saturday", "Later",
          "At night", "The next day", "Before dinner", "That afternoon")
_OBJECTS = ("ball", "kite", "book", "hat", "box", "cup", "lamp", "bike", "drum", "map", "key", "boat",
            "shoe", "bag", "clock", "chair", "rock", "flower", "letter", "toy")
_ADJS = ("big", "small", "old", "new", "happy", "sad", "quiet", "loud", "bright", "dark", "soft",
         "warm", "cold", "tall", "little", "shiny", "heavy", "funny", "brave", "kind", "sleepy",
         "busy", "clever", "gentle", "fast", "slow")
_PERSON_ADJS = ("kind", "brave", "happy", "clever", "busy", "gentle", "quiet", "funny", "tall",
                "sleepy", "young", "old")
_FEELINGS = ("happy", "sad", "tired", "excited", "scared", "proud", "hungry", "surprised", "calm",
             "curious")
# (base, third person singular, past)
_VERBS_T = (("see", "sees", "saw"), ("find", "finds", "found"), ("take", "takes", "took"),
            ("like", "likes", "liked"), ("carry", "carries", "carried"), ("paint", "paints", "painted"),
            ("clean", "cleans", "cleaned"), ("open", "opens", "opened"), ("build", "builds", "built"),
            ("draw", "draws", "drew"), ("hold", "holds", "held"), ("fix", "fixes", "fixed"),
            ("lose", "loses", "lost"), ("give", "gives", "gave"), ("watch", "watches", "watched"))
_VERBS_I = (("run", "runs", "ran"), ("sing", "sings", "sang"), ("jump", "jumps", "jumped"),
            ("sleep", "sleeps", "slept"), ("laugh", "laughs", "laughed"), ("walk", "walks", "walked"),
            ("dance", "dances", "danced"), ("swim", "swims", "swam"), ("wait", "waits", "waited"),
            ("smile", "smiles", "smiled"), ("play", "plays", "played"), ("read", "reads", "read"))
_ADVERBS = ("slowly", "quickly", "happily", "quietly", "carefully", "loudly", "again", "together")
_WEATHER = ("sunny", "rainy", "windy", "cloudy", "snowy", "foggy", "warm", "cold")

# Fixed facts: true statements about the small world, repeated so they can be learned.
_FACTS = (
    "The sun is hot.", "The sun rises in the morning.", "The moon shines at night.",
    "Snow is cold and white.", "Grass is green.", "The sky is blue on a clear day.",
    "Fish live in water.", "Birds can fly.", "A cow says moo.", "A dog says woof.",
    "A cat says meow.", "A duck says quack.", "Bees make honey.", "Cows give milk.",
    "Hens lay eggs.", "Rain falls from clouds.", "Ice melts when it is warm.",
    "Water boils when it is very hot.", "A week has seven days.", "A day has twenty four hours.",
    "There are twelve months in a year.", "Apples grow on trees.", "Carrots grow in the ground.",
    "Frogs can jump and swim.", "Turtles move slowly.", "Rabbits like carrots.",
    "Owls are awake at night.", "Plants need water and light.", "The river flows to the sea.",
    "Bread is made from flour.", "Two and two make four.", "Three and four make seven.",
    "Ten is more than five.", "Winter is colder than summer.", "Leaves fall in autumn.",
    "Flowers bloom in spring.", "A triangle has three sides.", "A square has four sides.",
)
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten", "eleven", "twelve")


@dataclass(frozen=True)
class Character:
    """One recurring person of the corpus; the same attributes every time they appear."""

    name: str
    she: bool  # pronoun choice
    pet_kind: str
    pet_name: str
    color: str
    town: str
    job: str
    food: str
    friend: str

    @property
    def subj(self) -> str:
        return "She" if self.she else "He"

    @property
    def poss(self) -> str:
        return "her" if self.she else "his"


def _make_characters() -> tuple[Character, ...]:
    # A fixed seed, not the caller's: the cast is part of the world, identical in every corpus.
    rng = random.Random(1234)
    names = [(n, True) for n in _NAMES_F] + [(n, False) for n in _NAMES_M]
    rng.shuffle(names)
    cast = []
    for i, (name, she) in enumerate(names):
        cast.append(
            Character(
                name=name,
                she=she,
                pet_kind=rng.choice(_PET_KINDS),
                pet_name=_PET_NAMES[i % len(_PET_NAMES)],
                color=rng.choice(_COLORS),
                town=rng.choice(_TOWNS),
                job=rng.choice(_JOBS),
                food=rng.choice(_FOODS),
                friend=names[(i + 1) % len(names)][0],
            )
        )
    return tuple(cast)


CHARACTERS: tuple[Character, ...] = _make_characters()
_BY_NAME = {c.name: c for c in CHARACTERS}


# ---- sentence builders --------------------------------------------------------------------------


def _np(rng: random.Random) -> str:
    # A noun phrase: "the old kite" or "a box".
    if rng.random() < 0.5:
        return f"the {rng.choice(_ADJS)} {rng.choice(_OBJECTS)}"
    obj = rng.choice(_OBJECTS)
    return f"{'an' if obj[0] in 'aeiou' else 'a'} {obj}"


def _grammar_sentence(rng: random.Random) -> str:
    """Present-tense sentence from a tiny grammar, with subject-verb agreement."""
    roll = rng.random()
    if roll < 0.35:
        subj = f"The {rng.choice(_ADJS)} {rng.choice(_PET_KINDS)}"
        verb = rng.choice(_VERBS_I)[1]
        tail = rng.choice((f" in {rng.choice(_PLACES)}", f" {rng.choice(_ADVERBS)}", ""))
        return f"{subj} {verb}{tail}."
    if roll < 0.7:
        c = rng.choice(CHARACTERS)
        verb = rng.choice(_VERBS_T)[1]
        return f"{c.name} {verb} {_np(rng)} at {rng.choice(_PLACES)}."
    if roll < 0.85:
        who = rng.choice(("The children", "The birds", "My friends", "We", "They", "The farmers"))
        verb = rng.choice(_VERBS_I)[0]
        return f"{who} {verb} {rng.choice(_ADVERBS)} near {rng.choice(_PLACES)}."
    c = rng.choice(CHARACTERS)
    return f"It is {rng.choice(_WEATHER)} in {c.town} today, so {c.name} stays {rng.choice(('inside', 'outside'))}."


def _story(rng: random.Random) -> str:
    hero = rng.choice(CHARACTERS)
    friend = _BY_NAME[hero.friend]
    lines = [
        rng.choice(("Once upon a time", "One day", "Long ago", "Last summer"))
        + f", there was a {rng.choice(_PERSON_ADJS)} {hero.job} named {hero.name} who lived in {hero.town}.",
        f"{hero.name} had a {hero.pet_kind} named {hero.pet_name}.",
    ]
    obj = rng.choice(_OBJECTS)
    place = rng.choice(_PLACES)
    events: list[Callable[[], str]] = [
        lambda: f"{rng.choice(_TIMES)}, {hero.name} and {hero.pet_name} went to {place}.",
        lambda: f"There, {hero.subj.lower()} found a {rng.choice(_COLORS)} {obj}.",
        lambda: f"{hero.name} {rng.choice(_VERBS_T)[2]} the {obj} and felt {rng.choice(_FEELINGS)}.",
        lambda: f"{hero.pet_name} {rng.choice(_VERBS_I)[2]} {rng.choice(_ADVERBS)}.",
        lambda: f"Then {hero.name} met {hero.poss} friend {friend.name}.",
        lambda: f'"Look at my {obj}!" said {hero.name}. "It is {rng.choice(_ADJS)}," said {friend.name}.',
        lambda: f"{friend.name} and {hero.name} {rng.choice(_VERBS_I)[2]} together at {place}.",
        lambda: f"They ate {hero.food} because {hero.food} is what {hero.name} likes best.",
        lambda: f"The weather was {rng.choice(_WEATHER)}, but nobody minded.",
        lambda: f"{hero.name} wore {hero.poss} {hero.color} {rng.choice(('hat', 'coat', 'scarf', 'shoes'))}.",
    ]
    n = rng.randint(3, len(events))
    picked = sorted(rng.sample(range(len(events)), n))  # keep story order
    lines += [events[i]() for i in picked]
    lines.append(
        rng.choice(
            (
                f"At the end of the day, {hero.name} went home to {hero.town}, {rng.choice(_FEELINGS)}.",
                f"{hero.name} smiled. It was a good day.",
                "The end.",
            )
        )
    )
    return " ".join(lines)


def _profile(rng: random.Random) -> str:
    c = rng.choice(CHARACTERS)
    facts = [
        f"{c.name} is a {c.job}.",
        f"{c.subj} lives in {c.town}.",
        f"{c.poss.capitalize()} favorite color is {c.color}.",
        f"{c.subj} has a {c.pet_kind} named {c.pet_name}.",
        f"{c.poss.capitalize()} favorite food is {c.food}.",
        f"{c.poss.capitalize()} best friend is {c.friend}.",
    ]
    rng.shuffle(facts)
    k = rng.randint(2, len(facts))
    return f"About {c.name}. " + " ".join(facts[:k])


def _qa(rng: random.Random) -> str:
    # Questions about the fixed cast: the answers never change, so they are learnable.
    c = rng.choice(CHARACTERS)
    q = rng.randrange(5)
    if q == 0:
        return f"Question: Where does {c.name} live? Answer: {c.name} lives in {c.town}."
    if q == 1:
        return f"Question: What is the name of {c.name}'s {c.pet_kind}? Answer: {c.pet_name}."
    if q == 2:
        return f"Question: What does {c.name} do? Answer: {c.name} is a {c.job}."
    if q == 3:
        return f"Question: What is {c.name}'s favorite color? Answer: {c.color}."
    return f"Question: Who is {c.name}'s best friend? Answer: {c.friend}."


def _facts(rng: random.Random) -> str:
    return " ".join(rng.sample(_FACTS, rng.randint(3, 8)))


def _dialogue(rng: random.Random) -> str:
    a = rng.choice(CHARACTERS)
    b = _BY_NAME[a.friend] if rng.random() < 0.6 else rng.choice(CHARACTERS)
    place = rng.choice(_PLACES)
    turns = [
        f"{a.name}: Hello, {b.name}! How are you?",
        f"{b.name}: I am {rng.choice(_FEELINGS)}, thank you. Where are you going?",
        f"{a.name}: I am going to {place} with {a.pet_name}.",
    ]
    extra = [
        f"{b.name}: Can I come too?",
        f"{a.name}: Yes! We can bring some {a.food}.",
        f"{b.name}: Is it {rng.choice(_WEATHER)} there?",
        f"{a.name}: I think so. Do you have your {rng.choice(_OBJECTS)}?",
        f"{b.name}: No, I lost it at {rng.choice(_PLACES)}.",
        f"{a.name}: Let us look for it {rng.choice(('tomorrow', 'later', 'after lunch'))}.",
    ]
    turns += extra[: rng.randint(0, len(extra))]
    turns.append(f"{b.name}: Goodbye, {a.name}!")
    return "\n".join(turns)


def _counting(rng: random.Random) -> str:
    start = rng.randint(0, 8)
    n = rng.randint(3, 5)
    words = _NUMBER_WORDS[start : start + n]
    return f"Let us count: {', '.join(words)}. " + " ".join(
        f"{w.capitalize()} is {i}." for i, w in enumerate(words, start)
    )


def _paragraph(rng: random.Random) -> str:
    return " ".join(_grammar_sentence(rng) for _ in range(rng.randint(3, 7)))


# (weight, builder): stories dominate; the rest add variety and fixed, learnable facts.
_KINDS: tuple[tuple[float, Callable[[random.Random], str]], ...] = (
    (0.34, _story),
    (0.16, _dialogue),
    (0.14, _paragraph),
    (0.12, _profile),
    (0.10, _qa),
    (0.08, _facts),
    (0.06, _counting),
)


def english_documents(n_chars: int, seed: int = 0) -> list[str]:
    """English-like documents totalling at least ``n_chars`` characters (deterministic in seed)."""
    if n_chars < 0:
        raise ConfigError(f"n_chars={n_chars} must be >= 0", hint="pass e.g. n_chars=2_000_000")
    rng = random.Random(seed)
    builders = [b for _, b in _KINDS]
    weights = [w for w, _ in _KINDS]
    docs: list[str] = []
    total = 0
    while total < n_chars:
        # Draw 256 document kinds at a time: one choices() call is far cheaper than 256.
        for build in rng.choices(builders, weights, k=256):
            doc = build(rng)
            docs.append(doc)
            total += len(doc)
            if total >= n_chars:
                break
    return docs


def embedded_corpus(
    n_chars: int = DEFAULT_N_CHARS, seed: int = 0, *, task_fraction: float = 0.2
) -> list[str]:
    """The default training corpus: English-like documents with task documents mixed in.

    ``task_fraction`` of the characters are verifiable task lines from ``deploykit.data.tasks``
    (train split only, so the held-out eval set never appears here). Documents are interleaved
    deterministically so any prefix of the list has the same mix.
    """
    if not 0.0 <= task_fraction <= 1.0:
        raise ConfigError(
            f"task_fraction={task_fraction} must be in [0, 1]", hint="pass e.g. task_fraction=0.2"
        )
    n_task = int(n_chars * task_fraction)
    prose = english_documents(n_chars - n_task, seed)
    tasks = task_documents(n_task, seed=seed, split="train") if n_task else []
    # Interleave at a fixed ratio rather than shuffling, so the mix is even along the list.
    out: list[str] = []
    if not tasks or not prose:
        return prose + tasks
    ratio = len(prose) / len(tasks)
    j = 0
    for i, doc in enumerate(prose):
        out.append(doc)
        while j < len(tasks) and j * ratio <= i:
            out.append(tasks[j])
            j += 1
    out.extend(tasks[j:])
    return out
