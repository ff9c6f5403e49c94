"""The parity proof: fixed probe inputs run through the fp32 torch model and a converted artifact.

Per probe it measures max |Δlogit|, mean KL(p_ref ‖ p_art) per position and top-1 agreement; a few
prompts are also decoded greedily on both sides through their own decode sessions (the artifact's KV
cache included) and compared token for token.

How the numbers meet a :class:`~deploykit.deploy.backend.Tolerance`:

- max |Δlogit| must hold at every position of every probe (a max is a max), with one exception for
  MoE models: a position where the fp32 router was within ``tolerance.router_tie`` of a tie between
  its k-th and (k+1)-th expert may take the other expert under the scheme's rounding, and then its
  logits legitimately jump. Such positions are excused from the max (reported, with their own max),
  up to ``TIE_BUDGET`` of all positions; more than that is a violation;
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
# use (random ids give flat, atypical distributions). Fixed here, so probes never change silently.
PROBE_TEXT = (
    "Once upon a time, there was a little girl named Lily who lived in a small house near the woods. "
    "Every morning she walked to the river with her dog Max. One day, Max found a shiny red ball under "
    "a tree. \"Look at my ball!\" said Lily. They played until the sun went down, and then they went home "
    "for soup. The end.\n"
    "Q: 12+30=? A: 42\nQ: reverse a b c A: c b a\nQ: 7*6=? A: 42\n"
    "Tom was a kind baker who lived in a busy town. He made bread and cakes for all his friends. On a "
    "cold day, a cat came to his shop. Tom gave the cat some milk, and the cat stayed with him forever. "
    "Anna asked, \"Why do you like the cat?\" Tom said, \"Because she is my friend.\" "
)
GREEDY_PROMPTS = ("Once upon a time", "Q: 21+14=? A:", "Tom and Anna went to the", "The dog",
                  "One day, a little bird", "Q: reverse d o g A:")
# Calibration text for static quantisation and QAT: same style as the probes, different sentences, so
# the proof is not measured on the very inputs the quantiser saw.
CALIBRATION_TEXT = (
    "One day, a happy boy named Ben went to the park with his mother. He saw a big tree and a small "
    "bird. The bird sang a song, and Ben laughed. \"Can I take the bird home?\" asked Ben. His mother "
    "said, \"No, the bird lives here.\" Ben waved goodbye and they went home for dinner. The end.\n"
    "Q: 45+17=? A: 62\nQ: 9*8=? A: 72\nQ: 80-35=? A: 45\nQ: sort 5 2 9 1 A: 1 2 5 9\n"
    "Sara was a brave farmer who lived near the sea. Every day she fed her goats and her chickens. When "
    "the storm came, Sara put all the animals in the barn. Her friend Jack helped her close the door. "
    "After the rain, they sat by the fire and ate warm bread. Sara said, \"Thank you, Jack.\" "
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
        if not self.max_abs_logit <= t.max_abs_logit or math.isnan(self.max_abs_logit):
            out.append(f"max |Δlogit| {self.max_abs_logit:.4g} > {t.max_abs_logit:g}")
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
                lines.append(f"{p.name}: max|Δlogit|={p.max_abs_logit:.4g}{ties} KL={p.mean_kl:.3g} top1={p.top1:.3f}")
            else:
                lines.append(f"{p.name}: greedy match {p.matched}/{p.tokens}, free-running prefix {p.prefix}"
                             f"{' ' + p.detail if p.detail else ''}")
        return lines

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "quant": self.quant, "tolerance": asdict(self.tolerance),
            "passed": self.passed(),
            "summary": {"max_abs_logit": self.max_abs_logit, "mean_kl": self.mean_kl, "top1": self.top1,
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
        for col in ("probe", "tokens", "max |Δlogit|", "mean KL", "top-1", "greedy"):
            table.add_column(col, justify="left" if col == "probe" else "right")

        def fmt(v: float | None, spec: str) -> str:
            return "" if v is None else format(v, spec)

        for p in self.probes:
            if p.kind == "logits":
                ties = f" (+{p.tie_excused} tie: {p.max_abs_logit_excused:.3g})" if p.tie_excused else ""
                table.add_row(p.name, str(p.tokens), fmt(p.max_abs_logit, ".4g") + ties, fmt(p.mean_kl, ".3g"),
                              fmt(p.top1, ".3f"), "")
            else:
                table.add_row(p.name, str(p.tokens), "", "", "", f"{p.matched}/{p.tokens} (prefix {p.prefix})")

        def mark(good: bool, text: str) -> str:
            return f"[green]{text}[/]" if good else f"[red]{text}[/]"

        table.add_section()
        table.add_row("[bold]all[/]", "", mark(self.max_abs_logit <= t.max_abs_logit, f"{self.max_abs_logit:.4g}"),
                      mark(self.mean_kl <= t.max_kl, f"{self.mean_kl:.3g}"), mark(self.top1 >= t.min_top1, f"{self.top1:.3f}"),
                      mark(self.greedy_match >= t.min_greedy_match, f"{self.greedy_match:.3f}"))
        table.add_row("[dim]tolerance[/]", "", f"≤ {t.max_abs_logit:g}", f"≤ {t.max_kl:g}", f"≥ {t.min_top1:g}",
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
                   bound: float = math.inf) -> ProbeResult:
    """ref, art (B, T, V) -> one ProbeResult over all B*T positions.

    ``near_tie`` (B, T) marks positions where the fp32 router was near a tie: those past ``bound``
    are counted as excused instead of setting max_abs_logit.
    """
    if ref.shape != art.shape:
        # A shape mismatch is a conversion bug, not a tolerance question: report it as infinitely far.
        return ProbeResult(name=name, kind="logits", tokens=int(np.prod(ref.shape[:2])), max_abs_logit=math.inf,
                           mean_kl=math.inf, top1=0.0, kl_sum=math.inf, detail=f"shape {art.shape} != {ref.shape}")
    ref2, art2 = ref.reshape(-1, ref.shape[-1]), art.reshape(-1, art.shape[-1])  # (N, V)
    n = ref2.shape[0]
    per_pos = np.max(np.abs(ref2.astype(np.float64) - art2), axis=-1)  # (N,)
    per_pos = np.where(np.isfinite(art2).all(-1), per_pos, math.inf)
    excused = np.zeros(n, bool) if near_tie is None else near_tie.reshape(-1) & (per_pos > bound)
    excused &= np.isfinite(per_pos)  # a non-finite logit is never rounding
    max_abs = float(per_pos[~excused].max(initial=0.0))
    lp, lq = _log_softmax(ref2), _log_softmax(art2)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)  # (N,) KL(p_ref ‖ p_art)
    kl = np.maximum(kl, 0.0)  # rounding can give -1e-17
    hits = int(np.sum(ref2.argmax(-1) == art2.argmax(-1)))
    kl_sum = float(kl.sum()) if np.isfinite(kl).all() else math.inf
    return ProbeResult(name=name, kind="logits", tokens=n, max_abs_logit=max_abs, mean_kl=kl_sum / n,
                       top1=hits / n, kl_sum=kl_sum, top1_hits=hits, tie_excused=int(excused.sum()),
                       max_abs_logit_excused=float(per_pos[excused].max()) if excused.any() else None)


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
        results.append(compare_logits(name, ref, art, near_tie=near_tie, bound=tolerance.max_abs_logit))
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
