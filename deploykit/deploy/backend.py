"""What a backend is: the contract every built-in and third-party backend implements.

A backend converts a deploykit model into an artifact folder and loads that folder back as a
:class:`Runner`. deploykit itself (``deploykit.convert``) owns everything around that: parsing the
scheme's options, the thread count, the temporary folder and atomic rename, the manifest, the parity
proof against the fp32 model and its tolerance check. So a backend module stays readable in one
sitting: ``convert``, ``load``, ``missing_requirements``. Torch-graph backends share the rest
(module roles, swapping, saving and rebuilding): ``deploykit.deploy.roles`` and ``deploykit.deploy.torchgraph``.

Backends import the core (this module, ``deploykit.model.graph``...), never each other; the core imports no
backend — it finds them through the ``deploykit.backends`` entry-point group (see ``deploykit.deploy.registry``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..errors import BackendError, ConfigError
from ..model.generation import DecodeSession, SamplingConfig, decode_loop
from .options import NoOptions, SchemeOptions

if TYPE_CHECKING:
    from ..model.config import ModelConfig
    from ..model.graph import CausalLM
    from ..model.tokenizer import Tokenizer


@dataclass(frozen=True)
class Tolerance:
    """How far an artifact may drift from the fp32 torch model before convert fails.

    Checked on fixed probe inputs: max |Δlogit| over all positions, top-1 agreement and mean
    KL(p_ref ‖ p_artifact) per position, and the share of greedy-decoded tokens that match.

    ``router_tie`` is for MoE models, whose function jumps where a router's k-th and (k+1)-th experts
    tie: a position where the fp32 router's gap between them is below ``router_tie`` times that
    layer's router-logit std may change experts under this scheme's rounding, and its logits with
    them. Such a position may exceed ``max_abs_logit`` (it still counts in KL, top-1 and greedy);
    at most 1 % of positions may (``deploykit.deploy.parity.TIE_BUDGET``). 0 excuses none.
    """

    max_abs_logit: float
    min_top1: float
    max_kl: float
    min_greedy_match: float
    router_tie: float = 0.0

    def __post_init__(self) -> None:
        if self.max_abs_logit < 0 or self.max_kl < 0 or self.router_tie < 0:
            raise ConfigError(f"Tolerance {self}: max_abs_logit, max_kl and router_tie must be >= 0")
        if not (0 <= self.min_top1 <= 1 and 0 <= self.min_greedy_match <= 1):
            raise ConfigError(f"Tolerance {self}: min_top1 and min_greedy_match must be in [0, 1]")


# Shared tolerance tiers; a backend may declare its own per scheme. router_tie: bf16/fp16 move router
# logits by well under 1 % of their std (a bf16 flip was seen at a gap of 0.35 % of it), int8 by more.
EXACT = Tolerance(max_abs_logit=1e-3, min_top1=1.0, max_kl=1e-6, min_greedy_match=1.0)
HALF = Tolerance(max_abs_logit=0.25, min_top1=0.97, max_kl=2e-3, min_greedy_match=0.9, router_tie=0.02)
INT8 = Tolerance(max_abs_logit=2.5, min_top1=0.85, max_kl=0.05, min_greedy_match=0.6, router_tie=0.05)
LOSSY = Tolerance(max_abs_logit=8.0, min_top1=0.5, max_kl=0.5, min_greedy_match=0.25, router_tie=0.1)


@dataclass(frozen=True)
class Scheme:
    """A quantization / optimisation scheme a backend offers (``fp32``, ``int8-dynamic``...).

    ``options`` is the scheme's :class:`~deploykit.deploy.options.SchemeOptions` class: deploykit
    parses ``--option key=value`` into it once and the backend reads typed fields.
    """

    name: str
    description: str
    tolerance: Tolerance
    options: type[SchemeOptions] = NoOptions

    def parse_options(self, given: Mapping[str, Any] | None, *, backend: str) -> SchemeOptions:
        return self.options.parse(given, where=f"{backend}/{self.name}")


def _no_progress(message: str) -> None:
    pass


@dataclass(frozen=True)
class ConvertContext:
    """What deploykit hands a backend's ``convert`` besides the model."""

    source: Path | None  # the checkpoint folder converted (None when converting an in-memory model)
    tokenizer: Tokenizer | None
    calibration: list[list[int]] = field(default_factory=list)  # token sequences for static quant / QAT
    threads: int | None = None  # torch's thread count is already set to it; runtimes of their own use it
    options: SchemeOptions = field(default_factory=NoOptions)  # the scheme's options, parsed and validated
    progress: Callable[[str], None] = _no_progress  # report a stage ("exporting", "quantizing")


@dataclass(frozen=True)
class RunnerInfo:
    """What every runner says about itself, with the same keys for every backend.

    ``size_bytes`` is the artifact's model files (weights, graphs, configs), the number reports call
    its size; ``details`` holds the backend's own facts (ISA, opset, providers, layout...).
    """

    backend: str
    quant: str
    kv_cache: bool
    size_bytes: int = 0
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    threads: int | None = None  # None: the runtime's default
    parameters: int | None = None
    vocab_size: int | None = None
    max_length: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or not self.backend or not isinstance(self.quant, str):
            raise ConfigError(f"RunnerInfo: backend={self.backend!r} and quant={self.quant!r} must be non-empty strings")
        if not isinstance(self.kv_cache, bool):
            raise ConfigError(f"RunnerInfo: kv_cache={self.kv_cache!r} must be True or False")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Runner(ABC):
    """A loaded artifact, the same API for every backend. Safe to call from several threads at once.

    Subclasses implement ``forward`` and, where the runtime can carry a KV cache, ``new_session``.
    """

    info: RunnerInfo  # set by subclasses
    tokenizer: Any = None
    eos_token_id: int | None = None
    max_length: int | None = None

    @abstractmethod
    def forward(self, input_ids: Any) -> np.ndarray:
        """Logits (B, T, V) float32 for input_ids (numpy array, torch tensor or nested list, (B, T) or (T,))."""

    def new_session(self) -> DecodeSession:
        """Incremental decoding state. Default: recompute the whole sequence at every step."""
        return RecomputeSession(self)

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> str | list[int]:
        """Continue a prompt. A string prompt returns the continuation as text, token ids return ids."""
        as_text = isinstance(prompt, str)
        if as_text:
            if self.tokenizer is None:
                raise ConfigError("this artifact has no tokenizer; pass token ids instead of text")
            ids = self.tokenizer.encode(prompt, add_bos=True)
        else:
            ids = [int(t) for t in prompt]
        detok = (lambda new: self.tokenizer.decode(new)) if self.tokenizer is not None else None
        new = decode_loop(
            self.new_session(), ids, max_new_tokens=max_new_tokens,
            sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
            eos_token_id=self.eos_token_id, max_length=self.max_length, stop=stop, detokenize=detok,
        )
        return self.tokenizer.decode(new) if as_text else new


class RecomputeSession:
    """DecodeSession for runtimes without a KV cache: re-run the whole sequence at every step."""

    def __init__(self, runner: Runner) -> None:
        self.runner, self.ids = runner, []

    def feed(self, token_ids: Sequence[int]) -> np.ndarray:
        self.ids.extend(int(t) for t in token_ids)
        return self.runner.forward(np.asarray([self.ids], dtype=np.int64))[0, -1]


def as_int64_batch(input_ids: Any) -> np.ndarray:
    """Normalise runner input to a contiguous int64 array (B, T)."""
    if hasattr(input_ids, "detach"):  # torch tensor
        input_ids = input_ids.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64))
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ConfigError(f"input_ids must have shape (B, T) or (T,) with T >= 1, got {arr.shape}")
    return arr


class Backend(ABC):
    """A deployment target. Subclass, fill the class attributes, implement ``convert`` and ``load``.

    Heavy imports (onnxruntime, tensorflow...) belong inside methods so that listing backends works
    with only the core installed.
    """

    name: ClassVar[str]  # short, lowercase: "torch", "onnx", "gguf"...
    description: ClassVar[str]
    schemes: ClassVar[tuple[Scheme, ...]]  # the first one is the default
    artifact_files: ClassVar[tuple[str, ...]]  # glob patterns of the files convert writes
    platforms: ClassVar[str] = "CPU"  # where artifacts run, for reports ("CPU", "CPU/GPU", "NVIDIA GPU")

    @property
    def default_scheme(self) -> str:
        return self.schemes[0].name

    def scheme(self, name: str | None) -> Scheme:
        name = name or self.default_scheme
        for s in self.schemes:
            if s.name == name:
                return s
        raise BackendError(f"backend {self.name!r} has no scheme {name!r}",
                           hint=f"valid schemes for {self.name}: {', '.join(s.name for s in self.schemes)}")

    def missing_requirements(self) -> list[str]:
        """Human-readable reasons this backend cannot run here (empty list: available).

        E.g. "onnxruntime is not installed: pip install 'deploykit[onnx]'", "no CUDA GPU", "not macOS".
        """
        return []

    def unsupported(self, scheme: Scheme, config: ModelConfig) -> str | None:
        """Why ``scheme`` cannot convert a model with this ``ModelConfig`` (None: it can).

        E.g. a scheme for MoE models asked to convert a dense one. ``convert`` refuses with this reason
        and the bench shows the row as not applicable instead of failing it.
        """
        return None

    def versions(self) -> dict[str, str]:
        """Versions of the libraries this backend uses, recorded in every manifest."""
        return {}

    @abstractmethod
    def convert(self, model: CausalLM, scheme: Scheme, out: Path, ctx: ConvertContext) -> dict[str, Any]:
        """Write the artifact's files into ``out`` (an empty temporary folder deploykit renames later).

        ``model`` is a deep copy of the deploykit ``CausalLM`` in fp32 eval mode, the backend's to
        change; ``scheme`` is one of ``schemes`` that ``unsupported`` accepted for its config, and
        ``ctx.options`` an instance of ``scheme.options``. Return backend-specific facts for the
        manifest (e.g. opset, graph names, quantized layers).
        """

    @abstractmethod
    def load(self, artifact: Path, manifest: dict[str, Any], *, threads: int | None = None) -> Runner:
        """Open a converted artifact folder as a Runner; ``threads`` (validated: None or >= 1) is the
        runtime's thread count (None: its default)."""

