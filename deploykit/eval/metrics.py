"""Generation metrics: exact match, token F1, BLEU and ROUGE-L.

BLEU is sacrebleu's corpus BLEU and ROUGE-L is rouge-score's F-measure (both well-kept libraries
with the reference implementations); exact match and token F1 follow SQuAD's definitions, which
are a few lines each (whitespace tokens; F1 on the multiset overlap).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def normalize(text: str) -> str:
    """The answer a completion gives: its first line, stripped (the task format's rule)."""
    return text.split("\n", 1)[0].strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == reference.strip())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), reference.split()
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100) with its default 13a tokenizer and exponential smoothing."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu([normalize(p) for p in predictions], [list(references)]).score)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (0-1) of rouge-score, without stemming (answers are not English words)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, normalize(p))["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores) if scores else 0.0
