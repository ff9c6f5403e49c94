"""The parity proof: fixed probe inputs run through the fp32 torch model and a converted artifact.

Per probe it measures max |Δlogit| (absolute, and divided by the fp32 logit range of its position),
mean KL(p_ref ‖ p_art) per position, top-1 agreement and both sides' negative log-likelihood of the
probe's own next tokens (the probes are text when the model has a tokenizer, so this is Δ perplexity
on text); a few prompts are also decoded greedily on both sides through their own decode sessions
(the artifact's KV cache included) and compared token for token.

How the numbers meet a :class:`~deploykit.deploy.backend.Tolerance`:

- max |Δlogit| (absolute and scaled) must hold at every position of every probe (a max is a max),
  with one exception for
  MoE models: a position where the fp32 router was within ``tolerance.router_tie`` of a tie between
  its k-th and (k+1)-th expert may take the other expert under the scheme's rounding, and then its
  logits legitimately jump. Such positions are excused from the max (reported, with their own max),
  up to ``TIE_BUDGET`` of all positions; more than that is a violation;
- Δ perplexity is exp(pooled mean NLL of the artifact - that of fp32) - 1 over every predicted
  position of every forward probe;
- KL and top-1 are pooled over all probe positions (excused ones included), so a one-position probe
  cannot flip the verdict on a single near-tie; greedy match is pooled over all generated tokens.

Greedy decoding: the fp32 model decodes N tokens greedily from each prompt; the artifact's own decode
session (its KV cache) is fed the same tokens and its next-token choice is compared at every step.
``greedy_match`` is the share of steps where the choices agree (token for token, same context). The
free-running agreement follows exactly: both sides decode the same text up to the first disagreement,
reported as ``prefix`` per prompt. The decision uses the per-step rate because after one near-tie
flip two free-running decodes continue different texts, and a barely trained model has near-ties.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .backend import Tolerance

if TYPE_CHECKING:
    from ..model.graph import CausalLM
    from .backend import Runner

# The longest forward probe. max_seq_len above this is probed up to the cap (stated in the report):
# a 4k-position probe would dominate convert time for models whose attention is already exercised.
MAX_PROBE_LEN = 512
GREEDY_TOKENS = 16
# Share of probe positions that may exceed max |Δlogit| at an fp32 router near-tie (see module doc):
# one flipped expert choice in a few hundred probe positions is rounding; many are a broken router.
TIE_BUDGET = 0.01

# Real text gives the model inputs it was trained on, so probe logits are peaked the way they are in
# use (random ids give flat, atypical distributions), and Δ perplexity on them means what it says.
# Documents of deploykit's embedded corpus generator, frozen here (english_documents(1500, seed=11)
# interleaved with task_documents(400, seed=11, split="eval"); the core does not import
# deploykit.data): the style deploykit's presets are trained on, from a seed no training run uses.
# (The hand-written story text used until issue 12 had words the embedded corpus never has: the demo
# micro, val ppl 3.9, scored perplexity 1,373 on it, so the proof measured quantization on text the
# model could not read — int8 KL 0.06-0.14 there against 3e-4-3e-3 on held-out text.)
PROBE_TEXT = (
    'Sara: Hello, Emma! How are you?\nEmma: I am surprised, thank you. Where are you going?\nSara: I '
    'am going to the school with Biscuit.\nEmma: Can I come too?\nSara: Yes! We can bring some '
    'milk.\nEmma: Is it rainy there?\nSara: I think so. Do you have your flower?\nEmma: No, I lost it '
    'at the zoo.\nEmma: Goodbye, Sara!\nQ: 46+57=? A: 103\nQ: u=7 x=0 ; x=? A: 0\nQ: reverse n d a j A: '
    'j a d n\nQ: 7+2=? A: 9\nQ: reverse w p o m d k A: k d m o p w\nQ: sort 69 89 37 63 50 A: 37 50 63 '
    '69 89\nThe shiny fish jumps. The birds sleep carefully near the zoo. Eli builds a cup at the '
    'lake. The farmers sleep quickly near the station.\nQ: reverse b b m q A: q m b b\nQ: 9*2=? A: '
    '18\nQ: 89+74=? A: 163\nQ: 37+23=? A: 60\nTurtles move slowly. A cow says moo. The river flows to '
    'the sea. Bread is made from flour. Bees make honey. The sun is hot. A square has four sides. '
    'Water boils when it is very hot.\nQ: 3*10=? A: 30\nLily: Hello, Eli! How are you?\nEli: I am '
    'surprised, thank you. Where are you going?\nLily: I am going to the hill with Pip.\nEli: Can I '
    'come too?\nLily: Yes! We can bring some cookies.\nEli: Is it foggy there?\nLily: I think so. Do '
    'you have your lamp?\nEli: No, I lost it at the school.\nLily: Let us look for it after '
    'lunch.\nEli: Goodbye, Lily!\nQ: sort 15 36 41 A: 15 36 41\nQ: 5*7=? A: 35\nQ: 85+22=? A: 107\nQ: '
    '49+48=? A: 97\nThe cold cat laughs. It is rainy in Fairport today, so Tom stays inside. Owen '
    'cleans a chair at the park.\nQ: a=8 c=4 j=1 l=1 ; c=? A: 4\nThe children dance slowly near the '
    'beach. Mia loses a chair at the library. It is cold in Maple Hill today, so Sam stays outside. '
    'Zoe finds a clock at the garden.\nQ: 54+34=? A: 88\nQ: z=9 j=8 q=2 ; j=? A: 8\nOne day, there was '
    'a tall pilot named Sam who lived in Maple Hill. Sam had a turtle named Pepper. There, he found '
    'a brown rock. Sam opened the rock and felt excited. Pepper danced quickly. Then Sam met his '
    'friend Jack. Jack and Sam waited together at the bakery. They ate milk because milk is what Sam '
    'likes best. Sam wore his black hat. Sam smiled. It was a good day.\n'
)
GREEDY_PROMPTS = ("Once upon a time", "Q: 21+14=? A:", "Tom and Anna went to the", "The dog",
                  "One day, a little bird", "Q: reverse d o g A:")
# Calibration text for static quantisation, QAT and SmoothQuant: same style as the probes, different
# documents (english_documents(1300, seed=13) and task_documents(350, seed=13, split="eval")), so the
# proof is not measured on the very inputs the quantiser saw.
CALIBRATION_TEXT = (
    'One day, there was a young singer named Noah who lived in Riverton. Noah had a fish named Coco. '
    'Before dinner, Noah and Coco went to the station. There, he found a black kite. Noah saw the '
    'kite and felt curious. Coco swam loudly. Then Noah met his friend Emma. They ate eggs because '
    'eggs is what Noah likes best. The weather was cloudy, but nobody minded. At the end of the day, '
    'Noah went home to Riverton, curious.\nQ: u=5 a=3 v=9 b=5 ; u=? A: 5\nQ: d=4 n=0 ; n=? A: 0\nAbout '
    'Eli. His favorite food is soup. Eli is a pilot.\nQ: 5*7=? A: 35\nQ: m=5 f=8 n=1 c=9 ; n=? A: 1\nQ: '
    'r=7 s=6 l=0 d=4 ; s=? A: 6\nAbout Tom. His favorite food is bread. His best friend is Ben. Tom '
    'is a pilot.\nQ: 56-0=? A: 56\nQ: 84-35=? A: 49\nQ: l=7 u=6 y=8 ; u=? A: 6\nQuestion: What does Mia '
    'do? Answer: Mia is a builder.\nQ: sort 94 40 90 65 A: 40 65 90 94\nQ: 3*10=? A: 30\nQ: 84-17=? A: '
    '67\nQ: 13+28=? A: 41\nQ: 34-1=? A: 33\nQ: 90-67=? A: 23\nOnce upon a time, there was a busy '
    'gardener named Lily who lived in Riverton. Lily had a dog named Pip. In the evening, Lily and '
    'Pip went to the library. There, she found a brown box. Then Lily met her friend Noah. "Look at '
    'my box!" said Lily. "It is gentle," said Noah. Lily wore her yellow hat. Lily smiled. It was a '
    'good day.\nQ: 95-34=? A: 61\nLast summer, there was a sleepy pilot named Ben who lived in Maple '
    'Hill. Ben had a hamster named Mochi. Ben cleaned the rock and felt sad. Then Ben met his friend '
    'Luke. They ate honey because honey is what Ben likes best. The weather was cloudy, but nobody '
    'minded. Ben smiled. It was a good day.\nQ: sort 59 14 29 14 10 A: 10 14 14 29 59\nQ: 5*9=? A: '
    '45\nQ: 38-34=? A: 4\nQ: s=5 q=9 w=9 ; q=? A: 9\nOnce upon a time, there was a funny gardener named '
    'Lily who lived in Riverton. Lily had a dog named Pip. Noah and Lily swam together at the '
    'garden. They ate cookies because cookies is what Lily likes best. The weather was sunny, but '
    'nobody minded. Lily smiled. It was a good day.\n'
)


@dataclass(frozen=True)
class ProbeSet:
    """The inputs of one parity check (token ids), fixed by the model config, tokenizer and seed."""

    sequences: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]  # (name, batch of equal-length rows)
    prompts: tuple[tuple[int, ...], ...]  # greedy-decoding prompts
    greedy_tokens: int
    max_len: int  # the longest probe
    model_max_len: int
    source: str  # "text" or "random"

    @property
    def capped(self) -> bool:
        return self.max_len < self.model_max_len


def _fill(ids: list[int], length: int) -> list[int]:
    """Repeat ``ids`` until ``length`` tokens (the max-length probe from a shorter text)."""
    return (ids * (length // max(len(ids), 1) + 1))[:length]


def make_probes(config: Any, tokenizer: Any = None, *, seed: int = 0, greedy_tokens: int = GREEDY_TOKENS,
                max_probe_len: int = MAX_PROBE_LEN) -> ProbeSet:
    """Fixed probes for ``config``: lengths 1, ~16, ~64 (batch of 2) and the max length (capped)."""
    max_len = min(config.max_seq_len, max_probe_len)
    vocab = config.vocab_size
    rng = np.random.default_rng(seed)
    usable = tokenizer is not None and tokenizer.vocab_size <= vocab
    if usable:
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        text = bos + tokenizer.encode(PROBE_TEXT)
        other = bos + tokenizer.encode(PROBE_TEXT[len(PROBE_TEXT) // 2:])  # a second row, different content
        prompts = [tokenizer.encode(p, add_bos=True) for p in GREEDY_PROMPTS]
        source = "text"
    else:
        text = [config.bos_token_id] + rng.integers(3, vocab, size=max_len).tolist()
        other = [config.bos_token_id] + rng.integers(3, vocab, size=max_len).tolist()
        prompts = [[config.bos_token_id] + rng.integers(3, vocab, size=n).tolist() for n in (3, 6, 9, 4, 5, 7)]
        source = "random"
    short, mid = min(16, max_len), min(64, max_len)
    seqs = [("len1", (tuple(text[:1]),)),
            (f"len{short}", (tuple(_fill(text, short)),)),
            (f"batch2x{mid}", (tuple(_fill(text[5:], mid)), tuple(_fill(other, mid)))),
            (f"max{max_len}", (tuple(_fill(text, max_len)),))]
    # Greedy prompts must leave room for the generated tokens inside max_seq_len.
    room = config.max_seq_len - greedy_tokens
    prompts = [tuple(p[:max(room, 1)]) for p in prompts]
    return ProbeSet(sequences=tuple(seqs), prompts=tuple(prompts), greedy_tokens=greedy_tokens,
                    max_len=max_len, model_max_len=config.max_seq_len, source=source)


def calibration_sequences(config: Any, tokenizer: Any = None, *, n: int = 16, length: int = 64,
                          seed: int = 1) -> list[list[int]]:
    """Token sequences for static quantisation / QAT: windows of CALIBRATION_TEXT (random ids without a tokenizer)."""
    length = min(length, config.max_seq_len)
    rng = np.random.default_rng(seed)
    if tokenizer is not None and tokenizer.vocab_size <= config.vocab_size:
        ids = tokenizer.encode(CALIBRATION_TEXT)
        ids = _fill(ids, max(len(ids), length + n))
        starts = rng.integers(0, len(ids) - length, size=n)
        return [[tokenizer.bos_id] + ids[s:s + length - 1] for s in starts]
    return [[config.bos_token_id] + rng.integers(3, config.vocab_size, size=length - 1).tolist() for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeResult:
    """One probe's numbers. Forward probes fill the logit metrics; greedy probes fill greedy_match."""

    name: str
    kind: str  # "logits" or "greedy"
    tokens: int  # positions compared (logits) or tokens generated (greedy)
    max_abs_logit: float | None = None
    mean_kl: float | None = None
    top1: float | None = None
    greedy_match: float | None = None
    kl_sum: float = 0.0  # for pooling: KL summed over positions
    top1_hits: int = 0
    matched: int = 0  # greedy: steps where both sides chose the same next token
    prefix: int = 0  # greedy: tokens both sides decode identically when running free
    detail: str = ""  # greedy: where it diverged
    tie_excused: int = 0  # logits: positions past max |Δlogit| at an fp32 router near-tie (not in max_abs_logit)
    max_abs_logit_excused: float | None = None  # logits: the largest |Δlogit| among those positions
    max_rel_logit: float | None = None  # logits: max |Δlogit| / fp32 logit range of the position (excused left out)
    nll_ref_sum: float = 0.0  # logits: fp32 NLL of each next probe token, summed (for Δ perplexity)
    nll_sum: float = 0.0  # logits: the artifact's NLL of the same tokens, summed
    nll_tokens: int = 0  # logits: predicted positions (T-1 per row)


@dataclass(frozen=True)
class ParityReport:
    backend: str
    quant: str
    tolerance: Tolerance
    probes: tuple[ProbeResult, ...]
    probe_source: str  # "text" or "random"
    max_len: int
    model_max_len: int
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    # -- pooled statistics (what the tolerance is checked against) -------------------------------
    @property
    def max_abs_logit(self) -> float:
        """Over every position but those excused at a router near-tie (see the module doc)."""
        return max((p.max_abs_logit for p in self.probes if p.kind == "logits"), default=0.0)

    @property
    def max_rel_logit(self) -> float:
        """max |Δlogit| / fp32 logit range, over every position but the excused ones."""
        return max((p.max_rel_logit or 0.0 for p in self.probes if p.kind == "logits"), default=0.0)

    @property
    def delta_ppl(self) -> float:
        """ppl_artifact / ppl_fp32 - 1 on the probes' next tokens, pooled (0 without a predicted token)."""
        n = sum(p.nll_tokens for p in self.probes if p.kind == "logits")
        if not n:
            return 0.0
        diff = sum(p.nll_sum - p.nll_ref_sum for p in self.probes if p.kind == "logits") / n
        return math.expm1(diff) if math.isfinite(diff) else math.inf

    @property
    def ppl_ref(self) -> float:
        n = sum(p.nll_tokens for p in self.probes if p.kind == "logits")
        return math.exp(sum(p.nll_ref_sum for p in self.probes if p.kind == "logits") / n) if n else math.nan

    @property
    def tie_excused(self) -> int:
        return sum(p.tie_excused for p in self.probes if p.kind == "logits")

    @property
    def tie_excused_share(self) -> float:
        n = sum(p.tokens for p in self.probes if p.kind == "logits")
        return self.tie_excused / max(n, 1)

    @property
    def mean_kl(self) -> float:
        n = sum(p.tokens for p in self.probes if p.kind == "logits")
        return sum(p.kl_sum for p in self.probes if p.kind == "logits") / max(n, 1)

    @property
    def top1(self) -> float:
        n = sum(p.tokens for p in self.probes if p.kind == "logits")
        return sum(p.top1_hits for p in self.probes if p.kind == "logits") / max(n, 1)

    @property
    def greedy_match(self) -> float:
        n = sum(p.tokens for p in self.probes if p.kind == "greedy")
        return sum(p.matched for p in self.probes if p.kind == "greedy") / n if n else 1.0

    @property
    def greedy_prefix(self) -> float:
        """Informational: share of greedy tokens decoded identically before the first free-running divergence."""
        n = sum(p.tokens for p in self.probes if p.kind == "greedy")
        return sum(p.prefix for p in self.probes if p.kind == "greedy") / n if n else 1.0

    def violations(self, tolerance: Tolerance | None = None) -> list[str]:
        """Each bound that is broken, as "metric value vs bound" (empty: passed)."""
        t = tolerance or self.tolerance
        out = []
        if t.max_delta_ppl is not None and not abs(self.delta_ppl) <= t.max_delta_ppl:
            out.append(f"Δ perplexity {self.delta_ppl:+.2%} beyond ±{t.max_delta_ppl:.2%}")
        if t.max_abs_logit is not None and (not self.max_abs_logit <= t.max_abs_logit or math.isnan(self.max_abs_logit)):
            out.append(f"max |Δlogit| {self.max_abs_logit:.4g} > {t.max_abs_logit:g}")
        if t.max_rel_logit is not None and not self.max_rel_logit <= t.max_rel_logit:
            out.append(f"max |Δlogit| / logit range {self.max_rel_logit:.4g} > {t.max_rel_logit:g}")
        if self.tie_excused_share > TIE_BUDGET:
            out.append(f"{self.tie_excused} positions ({self.tie_excused_share:.1%}) past max |Δlogit| at router "
                       f"near-ties > {TIE_BUDGET:.0%} of positions")
        if not self.mean_kl <= t.max_kl:
            out.append(f"mean KL {self.mean_kl:.4g} > {t.max_kl:g}")
        if not self.top1 >= t.min_top1:
            out.append(f"top-1 agreement {self.top1:.4f} < {t.min_top1:g}")
        if not self.greedy_match >= t.min_greedy_match:
            out.append(f"greedy match {self.greedy_match:.4f} < {t.min_greedy_match:g}")
        return out

    def passed(self, tolerance: Tolerance | None = None) -> bool:
        return not self.violations(tolerance)

    def per_probe_lines(self) -> list[str]:
        lines = []
        for p in self.probes:
            if p.kind == "logits":
                ties = (f" (+{p.tie_excused} at router near-ties, up to {p.max_abs_logit_excused:.4g})"
                        if p.tie_excused else "")
                rel = f" ({p.max_rel_logit:.3g} of range)" if p.max_rel_logit is not None else ""
                lines.append(f"{p.name}: max|Δlogit|={p.max_abs_logit:.4g}{rel}{ties} KL={p.mean_kl:.3g} top1={p.top1:.3f}"
                             f"{f' Δnll={(p.nll_sum - p.nll_ref_sum) / p.nll_tokens:+.4f}' if p.nll_tokens else ''}")
            else:
                lines.append(f"{p.name}: greedy match {p.matched}/{p.tokens}, free-running prefix {p.prefix}"
                             f"{' ' + p.detail if p.detail else ''}")
        return lines

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "quant": self.quant, "tolerance": asdict(self.tolerance),
            "passed": self.passed(),
            "summary": {"delta_ppl": self.delta_ppl, "ppl_fp32": self.ppl_ref, "max_abs_logit": self.max_abs_logit,
                        "max_rel_logit": self.max_rel_logit, "mean_kl": self.mean_kl, "top1": self.top1,
                        "greedy_match": self.greedy_match, "greedy_prefix": self.greedy_prefix,
                        "router_tie_excused": self.tie_excused},
            "violations": self.violations(),
            "probe_source": self.probe_source, "max_len": self.max_len, "model_max_len": self.model_max_len,
            "seconds": round(self.seconds, 3), "notes": list(self.notes),
            "probes": [asdict(p) for p in self.probes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParityReport:
        return cls(backend=data["backend"], quant=data["quant"], tolerance=Tolerance(**data["tolerance"]),
                   probes=tuple(ProbeResult(**p) for p in data["probes"]), probe_source=data["probe_source"],
                   max_len=data["max_len"], model_max_len=data["model_max_len"], seconds=data.get("seconds", 0.0),
                   notes=tuple(data.get("notes", ())))

    def table(self) -> Any:
        """A rich Table: one row per probe, then the pooled row checked against the tolerance."""
        from rich.table import Table

        t = self.tolerance
        ok = self.passed()
        title = (f"parity {self.backend}/{self.quant} vs fp32 torch: "
                 f"{'[green]PASS[/]' if ok else '[red]FAIL[/]'}  ({self.probe_source} probes"
                 f"{f', max length capped at {self.max_len} of {self.model_max_len}' if self.max_len < self.model_max_len else ''})")
        table = Table(title=title, title_justify="left")
        # max |Δlogit| shows its share of the logit range beside it: the bound is on that share.
        for col in ("probe", "n", "Δppl", "max |Δlogit|", "KL", "top-1", "greedy"):
            table.add_column(col, justify="left" if col == "probe" else "right")

        def fmt(v: float | None, spec: str) -> str:
            return "" if v is None else format(v, spec)

        for p in self.probes:
            if p.kind == "logits":
                ties = f" (+{p.tie_excused} tie: {p.max_abs_logit_excused:.3g})" if p.tie_excused else ""
                dppl = f"{math.expm1((p.nll_sum - p.nll_ref_sum) / p.nll_tokens):+.2%}" if p.nll_tokens else ""
                rel = f" ({p.max_rel_logit:.1%})" if p.max_rel_logit is not None else ""
                table.add_row(p.name, str(p.tokens), dppl, fmt(p.max_abs_logit, ".3g") + rel + ties,
                              fmt(p.mean_kl, ".3g"), fmt(p.top1, ".3f"), "")
            else:
                table.add_row(p.name, str(p.tokens), "", "", "", "", f"{p.matched}/{p.tokens} (prefix {p.prefix})")

        def mark(good: bool, text: str) -> str:
            return f"[green]{text}[/]" if good else f"[red]{text}[/]"

        def within(value: float, bound: float | None) -> bool:
            return bound is None or value <= bound

        def limit(bound: float | None, spec: str = "g") -> str:
            return "-" if bound is None else f"≤ {format(bound, spec)}"

        table.add_section()
        table.add_row("[bold]all[/]", "", mark(within(abs(self.delta_ppl), t.max_delta_ppl), f"{self.delta_ppl:+.2%}"),
                      mark(within(self.max_abs_logit, t.max_abs_logit) and within(self.max_rel_logit, t.max_rel_logit),
                           f"{self.max_abs_logit:.3g} ({self.max_rel_logit:.1%})"),
                      mark(self.mean_kl <= t.max_kl, f"{self.mean_kl:.3g}"), mark(self.top1 >= t.min_top1, f"{self.top1:.3f}"),
                      mark(self.greedy_match >= t.min_greedy_match, f"{self.greedy_match:.3f}"))
        table.add_row("[dim]tolerance[/]", "", "-" if t.max_delta_ppl is None else f"±{t.max_delta_ppl:.2%}",
                      " ".join(x for x in (limit(t.max_abs_logit), "" if t.max_rel_logit is None else
                                           f"(≤ {t.max_rel_logit:.0%})") if x != "-") or "-", f"≤ {t.max_kl:g}", f"≥ {t.min_top1:g}",
                      f"≥ {t.min_greedy_match:g}")
        return table


# ---------------------------------------------------------------------------------------------
# running the proof
# ---------------------------------------------------------------------------------------------
def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare_logits(name: str, ref: np.ndarray, art: np.ndarray, *, near_tie: np.ndarray | None = None,
                   bound: float | None = None, rel_bound: float | None = None,
                   ids: np.ndarray | None = None) -> ProbeResult:
    """ref, art (B, T, V) -> one ProbeResult over all B*T positions.

    ``near_tie`` (B, T) marks positions where the fp32 router was near a tie: those past ``bound``
    (absolute) or ``rel_bound`` (|Δlogit| / fp32 logit range) are counted as excused instead of
    setting the maxima. ``ids`` (B, T), the probe's tokens: each position's NLL of the next one is
    summed on both sides (for Δ perplexity).
    """
    if ref.shape != art.shape:
        # A shape mismatch is a conversion bug, not a tolerance question: report it as infinitely far.
        return ProbeResult(name=name, kind="logits", tokens=int(np.prod(ref.shape[:2])), max_abs_logit=math.inf,
                           mean_kl=math.inf, top1=0.0, kl_sum=math.inf, max_rel_logit=math.inf, detail=f"shape {art.shape} != {ref.shape}")
    ref2, art2 = ref.reshape(-1, ref.shape[-1]), art.reshape(-1, art.shape[-1])  # (N, V)
    n = ref2.shape[0]
    per_pos = np.max(np.abs(ref2.astype(np.float64) - art2), axis=-1)  # (N,)
    per_pos = np.where(np.isfinite(art2).all(-1), per_pos, math.inf)
    span = (ref2.max(-1) - ref2.min(-1)).astype(np.float64)  # (N,) the fp32 logit range per position
    rel = per_pos / np.maximum(span, 1e-12)  # (N,)
    past = (per_pos > (math.inf if bound is None else bound)) | (rel > (math.inf if rel_bound is None else rel_bound))
    excused = np.zeros(n, bool) if near_tie is None else near_tie.reshape(-1) & past
    excused &= np.isfinite(per_pos)  # a non-finite logit is never rounding
    max_abs = float(per_pos[~excused].max(initial=0.0))
    max_rel = float(rel[~excused].max(initial=0.0))
    lp, lq = _log_softmax(ref2), _log_softmax(art2)
    nll_ref = nll = 0.0
    nll_tokens = 0
    if ids is not None and ref.shape[1] > 1:
        B, T = ref.shape[:2]
        nxt = np.asarray(ids).reshape(B, T)[:, 1:].reshape(-1)  # (B*(T-1),) the token each position predicts
        rows = (np.arange(B)[:, None] * T + np.arange(T - 1)[None, :]).reshape(-1)  # positions 0..T-2 of each row
        nll_ref = float(-lp[rows, nxt].sum())
        nll = float(-lq[rows, nxt].sum())
        nll_tokens = int(rows.size)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)  # (N,) KL(p_ref ‖ p_art)
    kl = np.maximum(kl, 0.0)  # rounding can give -1e-17
    hits = int(np.sum(ref2.argmax(-1) == art2.argmax(-1)))
    kl_sum = float(kl.sum()) if np.isfinite(kl).all() else math.inf
    return ProbeResult(name=name, kind="logits", tokens=n, max_abs_logit=max_abs, mean_kl=kl_sum / n,
                       top1=hits / n, kl_sum=kl_sum, top1_hits=hits, tie_excused=int(excused.sum()),
                       max_abs_logit_excused=float(per_pos[excused].max()) if excused.any() else None,
                       max_rel_logit=max_rel, nll_ref_sum=nll_ref, nll_sum=nll if math.isfinite(nll) else math.inf,
                       nll_tokens=nll_tokens)


def _router_near_ties(reference: CausalLM, ids: Any, relative_gap: float) -> tuple[np.ndarray, Any]:
    """Run ``reference`` on ids (B, T); returns its logits and a (B, T) mask of router near-ties.

    A position is a near-tie when, at any MoE layer, the gap between the router's k-th and (k+1)-th
    largest logits is below ``relative_gap`` times the std of that layer's router logits.
    """
    import torch

    gaps: list[torch.Tensor] = []

    def record(module: Any, args: Any, logits: torch.Tensor) -> None:
        flat = logits.detach().float().reshape(-1, logits.shape[-1])  # (B*T, E)
        k = reference.config.top_k
        if k < flat.shape[-1]:
            top = torch.topk(flat, k + 1, dim=-1).values  # (B*T, k+1), descending
            gaps.append((top[:, k - 1] - top[:, k]) / flat.std().clamp(min=1e-12))

    hooks = [m.gate.register_forward_hook(record) for m in reference.moe_layers()] if relative_gap > 0 else []
    try:
        with torch.inference_mode():
            logits = reference(ids).float()
    finally:
        for h in hooks:
            h.remove()
    B, T = ids.shape
    near = torch.stack(gaps).amin(0) < relative_gap if gaps else torch.zeros(B * T, dtype=torch.bool)
    return logits.numpy(), near.reshape(B, T).numpy()


def _greedy(session: Any, prompt: tuple[int, ...], n: int) -> list[int]:
    from ..model.generation import SamplingConfig, decode_loop

    return decode_loop(session, list(prompt), max_new_tokens=n, sampling=SamplingConfig(), eos_token_id=None)


def run_parity(reference: CausalLM, runner: Runner, probes: ProbeSet, *, backend: str, quant: str,
               tolerance: Tolerance, notes: tuple[str, ...] = ()) -> ParityReport:
    """Compare ``runner`` with the fp32 ``reference`` model on ``probes``."""
    import torch

    from ..model.generation import TorchSession

    t0 = time.perf_counter()
    reference = reference.eval()
    results: list[ProbeResult] = []
    for name, rows in probes.sequences:
        ids = np.asarray(rows, dtype=np.int64)  # (B, T)
        ref, near_tie = _router_near_ties(reference, torch.from_numpy(ids), tolerance.router_tie)
        art = np.asarray(runner.forward(ids), dtype=np.float32)
        results.append(compare_logits(name, ref, art, near_tie=near_tie, bound=tolerance.max_abs_logit,
                                      rel_bound=tolerance.max_rel_logit, ids=ids))
    for i, prompt in enumerate(probes.prompts):
        want = _greedy(TorchSession(reference), prompt, probes.greedy_tokens)  # the reference's greedy text
        session = runner.new_session()
        logits = session.feed(list(prompt))
        got: list[int] = []
        for step, token in enumerate(want):
            got.append(int(np.argmax(logits)))
            if step + 1 < len(want):
                logits = session.feed([token])  # teacher forcing: same context as the reference
        hits = sum(a == b for a, b in zip(want, got))
        prefix = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), len(want))
        detail = "" if prefix == len(want) else f"(first diff at token {prefix}: {want[prefix]} vs {got[prefix]})"
        results.append(ProbeResult(name=f"greedy{i}", kind="greedy", tokens=len(want),
                                   greedy_match=hits / max(len(want), 1), matched=hits, prefix=prefix, detail=detail))
    return ParityReport(backend=backend, quant=quant, tolerance=tolerance, probes=tuple(results),
                        probe_source=probes.source, max_len=probes.max_len, model_max_len=probes.model_max_len,
                        seconds=time.perf_counter() - t0, notes=notes)
