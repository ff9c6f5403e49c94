"""One input check for every runner, in the contract: token ids, shapes, lengths and generation settings.

Parametrized over every built-in backend (torch fp32, onnx fp32, native int8, the checkpoint runner)
and runners written as a third party would, knowing nothing of the checks (they get them from the
``Runner`` base class). Then the same rules for ``deploykit generate``'s flags, and property-based
tests: no input to ``forward`` or a session's ``feed`` raises anything but a DeploykitError, and a
valid one gives finite logits of the right shape.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import deploykit
from deploykit import native
from deploykit.cli.main import main
from deploykit.deploy.backend import CheckedSession, Runner, RunnerInfo
from deploykit.errors import ConfigError, DeploykitError
from deploykit.model.checkpoint import load_model

VOCAB, MAX_LEN = 2048, 256  # the nano preset as conftest trains it


class NaiveRunner(Runner):
    """A third-party runner that trusts its input: torch.as_tensor straight into the model, the default
    (recomputing) session and the inherited generate. Everything it is protected from, the base gives it."""

    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.info = RunnerInfo(backend="naive", quant="fp32", kv_cache=False, vocab_size=model.config.vocab_size,
                               max_length=model.config.max_seq_len)

    def forward(self, input_ids):
        with torch.inference_mode():
            return self.model(torch.as_tensor(input_ids)).numpy()


class OwnLoopRunner(NaiveRunner):
    """A third-party runner with its own session and its own generate (as a runtime with a sampler has)."""

    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        super().__init__(model, tokenizer)
        self.calls: list[tuple] = []

    def new_session(self):
        runner = self

        class Session:
            def __init__(self) -> None:
                self.ids: list[int] = []

            def feed(self, token_ids):
                self.ids += list(token_ids)
                return runner.forward([self.ids])[0, -1]
        return Session()

    def generate(self, prompt, max_new_tokens=64, *, temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=()):
        self.calls.append((prompt, max_new_tokens, temperature, top_k, top_p, seed, stop))
        return [] if not isinstance(prompt, str) else ""


@pytest.fixture(scope="module")
def artifacts(nano_checkpoint, tmp_path_factory) -> dict:
    """Converted once per module, without the parity proof (it is not what is tested here)."""
    root = tmp_path_factory.mktemp("inputs")
    made = {}
    for backend, quant in (("torch", "fp32"), ("onnx", "fp32"), ("native", "int8"), ("gguf", "f32")):
        if backend == "native" and not native.available():
            continue
        made[backend] = deploykit.convert(nano_checkpoint, backend, quant, root / backend, verify=False).path
    return made


RUNNERS = ["torch-fp32", "onnx-fp32", "native-int8", "gguf-f32", "checkpoint", "third-party"]


@pytest.fixture(scope="module", params=RUNNERS)
def runner(request, artifacts, nano_checkpoint, tokenizer) -> Runner:
    name = request.param
    if name == "checkpoint":
        return deploykit.load(nano_checkpoint)
    if name == "third-party":
        return NaiveRunner(load_model(nano_checkpoint), tokenizer)
    backend = name.split("-")[0]
    if backend not in artifacts:
        pytest.skip(f"{backend}: {native.unavailable_reason()}")
    return deploykit.load(artifacts[backend])


def one_line(err: pytest.ExceptionInfo) -> str:
    """The message without its hint; it must be one line and there must be a hint."""
    message = str(err.value).split("\nHINT: ")[0]
    assert "\n" not in message and err.value.hint, str(err.value)
    return message


# -- forward -----------------------------------------------------------------------------------------
BAD_FORWARD = {
    "negative id": ([[1, -1, 5]], r"input_ids must be token ids in \[0, 2048\) .*got ids from -1 to 5"),
    "id == vocab": ([[1, VOCAB]], r"in \[0, 2048\).*got ids from 1 to 2048"),
    "huge id": ([[2**70]], r"in \[0, 2048\).*got id 1180591620717411303424"),
    "uint64 past int64": (np.array([[2**63 + 1]], dtype=np.uint64), r"in \[0, 2048\)"),
    "floats": ([[1.0, 2.0]], "must hold integer token ids, got dtype float64"),
    "float tensor": (torch.tensor([[1.0, 2.0]]), "must hold integer token ids, got dtype float32"),
    "bfloat16 tensor": (torch.tensor([[1.0]], dtype=torch.bfloat16), "got a tensor of torch.bfloat16"),
    "bools": ([[True, False]], "got dtype bool"),
    "bool tensor": (torch.tensor([[True]]), "got dtype bool"),
    "text": ("hello", "must be token ids, got text 'hello'"),
    "list of text": ([["a", "b"]], r"got dtype <U1 \(text\)"),
    "None": (None, "got a NoneType"),
    "None inside": ([[1, None]], "got a NoneType"),
    "dict": ({"input_ids": [1]}, "got a dict"),
    "ragged": ([[1, 2, 3], [4]], "must be a rectangular array"),
    "empty": ([], r"input_ids is empty \(shape \(0,\)\)"),
    "empty row": ([[]], r"input_ids is empty \(shape \(1, 0\)\)"),
    "empty batch": (np.zeros((0, 4), dtype=np.int64), "is empty"),
    "scalar": (7, "got a single id"),
    "3-D": ([[[1, 2]]], r"got shape \(1, 1, 2\)"),
    "too long": (np.ones((1, MAX_LEN + 1), dtype=np.int64), "257 tokens per sequence, more than this model's max_length=256"),
}


@pytest.mark.parametrize("case", BAD_FORWARD)
def test_bad_forward_input_is_a_config_error_naming_it(runner, case):
    value, pattern = BAD_FORWARD[case]
    with pytest.raises(ConfigError) as err:
        runner.forward(value)
    assert err.match(pattern) and one_line(err).startswith("input_ids ")


@pytest.mark.parametrize("form", ["list", "1-D", "int32", "uint16", "tensor", "non-contiguous", "max_length"])
def test_valid_forward_input_gives_finite_logits(runner, form):
    ids = np.arange(3, 3 + 12, dtype=np.int64).reshape(2, 6) * 7  # (B, T)
    value = {"list": ids.tolist(), "1-D": ids[0], "int32": ids.astype(np.int32), "uint16": ids.astype(np.uint16),
             "tensor": torch.from_numpy(ids), "non-contiguous": np.asfortranarray(ids),
             "max_length": np.full((1, MAX_LEN), VOCAB - 1)}[form]
    shape = (1, 6) if form == "1-D" else (1, MAX_LEN) if form == "max_length" else (2, 6)
    logits = runner.forward(value)
    assert logits.shape == (*shape, VOCAB) and logits.dtype == np.float32 and np.isfinite(logits).all()


# -- sessions ----------------------------------------------------------------------------------------
def test_a_refused_feed_leaves_the_session_as_it_was(runner):
    session = runner.new_session()
    assert isinstance(session, CheckedSession)
    session.feed([1, 40, 41])
    for bad, pattern in (([VOCAB], r"token_ids must be token ids in \[0, 2048\)"), ([-3], "got id -3"),
                         ([], "token_ids is empty"), ([[1, 2]], r"one sequence .*got shape \(1, 2\)"),
                         ([1.5], "got dtype float64"), ([1] * (MAX_LEN - 2), "makes 257, more than this model's max_length=256")):
        with pytest.raises(ConfigError, match=pattern):
            session.feed(bad)
    fresh = runner.new_session()
    fresh.feed([1, 40, 41])
    # Same tokens, same shapes, same runner: a refused feed that had touched the cache would differ.
    np.testing.assert_array_equal(session.feed([42]), fresh.feed([42]))
    assert session.length == 4


def test_a_session_fills_max_length_exactly(runner):
    session = runner.new_session()
    session.feed([1] * (MAX_LEN - 1))
    assert np.isfinite(session.feed([2])).all()
    with pytest.raises(ConfigError, match="after 256 makes 257"):
        session.feed([3])


# -- generate ----------------------------------------------------------------------------------------
BAD_GENERATE = {
    "prompt id >= vocab": (dict(prompt=[1, VOCAB + 5]), r"prompt must be token ids in \[0, 2048\).*got ids from 1 to 2053"),
    "negative prompt id": (dict(prompt=[-1]), "prompt must be token ids"),
    "float prompt": (dict(prompt=[1.5, 2.0]), "prompt must hold integer token ids"),
    "empty prompt": (dict(prompt=[]), "prompt is empty"),
    "2-D prompt": (dict(prompt=[[1, 2]]), "prompt must be one sequence"),
    "prompt too long": (dict(prompt=[1] * (MAX_LEN + 1)), "prompt has 257 tokens, more than this model's max_length=256"),
    "prompt fills max_length": (dict(prompt=[1] * MAX_LEN), "fills this model's max_length=256, leaving no room"),
    "text too long": (dict(prompt="the cat sat " * 200), r"prompt has \d+ tokens, more than this model's max_length=256"),
    "temperature nan": (dict(temperature=math.nan), "temperature=nan must be a finite number >= 0"),
    "temperature inf": (dict(temperature=math.inf), "temperature=inf must be a finite number"),
    "temperature < 0": (dict(temperature=-0.5), r"temperature=-0.5 must be >= 0"),
    "temperature text": (dict(temperature="hot"), "temperature='hot' must be a finite number"),
    "top_p 0": (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    "top_p > 1": (dict(top_p=1.5), r"must be in \(0, 1\]"),
    "top_p nan": (dict(top_p=math.nan), "top_p=nan must be a finite number"),
    "top_k < 0": (dict(top_k=-1), "top_k=-1 must be an integer >= 0"),
    "top_k float": (dict(top_k=2.5), "top_k=2.5 must be an integer"),
    "seed < 0": (dict(seed=-1), r"seed=-1 must be an integer >= 0 \(None for a fresh random seed\)"),
    "seed float": (dict(seed=1.5), "seed=1.5 must be an integer"),
    "max_new_tokens < 0": (dict(max_new_tokens=-1), "max_new_tokens=-1 must be an integer >= 0"),
    "max_new_tokens bool": (dict(max_new_tokens=True), "max_new_tokens=True must be an integer"),
    "max_new_tokens float": (dict(max_new_tokens=2.0), "max_new_tokens=2.0 must be an integer"),
    "empty stop": (dict(stop=["\n", ""]), "stop='' is empty"),
    "stop not text": (dict(stop=[None]), "stop=None is not a string"),
}


@pytest.mark.parametrize("case", BAD_GENERATE)
def test_bad_generate_input_is_a_config_error_naming_it(runner, case):
    kwargs, pattern = BAD_GENERATE[case]
    kwargs = {"prompt": [1, 40], "max_new_tokens": 3, **kwargs}
    with pytest.raises(ConfigError, match=pattern) as err:
        runner.generate(kwargs.pop("prompt"), **kwargs)
    one_line(err)


def test_valid_generate_settings(runner):
    ids = runner.generate([1, 40, 41], 4, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    assert len(ids) <= 4 and all(0 <= t < VOCAB for t in ids)
    assert runner.generate([1, 40], 4, temperature=0.7, seed=3) == runner.generate([1, 40], 4, temperature=0.7, seed=3)
    assert runner.generate(np.array([1, 40]), 0) == []
    assert len(runner.generate([1] * (MAX_LEN - 2), 10, stop="never")) <= 2  # a str is one stop string; capped at max_length
    assert isinstance(runner.generate("Once upon a time", 3, stop=["\n"]), str)


# -- third-party runners: checked without writing a check ---------------------------------------------
def test_third_party_session_and_generate_are_checked_too(nano_checkpoint, tokenizer):
    runner = OwnLoopRunner(load_model(nano_checkpoint), tokenizer)
    session = runner.new_session()
    assert isinstance(session, CheckedSession)
    with pytest.raises(ConfigError, match="token_ids must be token ids"):
        session.feed([VOCAB])
    assert session.ids == []  # the backend's own session never saw it (attributes pass through)
    with pytest.raises(ConfigError, match="seed=-1"):
        runner.generate([1, 2], seed=-1)
    with pytest.raises(ConfigError, match="prompt has 300 tokens"):
        runner.generate([1] * 300, 3)
    assert runner.calls == []  # refused before the runner's own generate ran
    runner.generate(np.array([1, 2], dtype=np.int32), 5, top_k=np.int64(3), stop="\n")
    assert runner.calls == [([1, 2], 5, 0.0, 3, 1.0, None, ("\n",))]  # normalised: list of ints, tuple of stops


def test_unknown_limits_still_refuse_what_is_never_a_token(nano_checkpoint, tokenizer):
    """A runner whose info does not know vocab_size/max_length: negative ids and non-integers are still refused."""
    runner = NaiveRunner(load_model(nano_checkpoint), tokenizer)
    runner.info = RunnerInfo(backend="naive", quant="fp32", kv_cache=False)
    with pytest.raises(ConfigError, match="must be token ids in non-negative int64, got id -1"):
        runner.forward([-1])
    with pytest.raises(ConfigError, match="got dtype float64"):
        runner.forward([0.5])
    assert runner.forward([5]).shape == (1, 1, VOCAB)


@pytest.mark.parametrize("field, value", [("vocab_size", 0), ("max_length", -1), ("vocab_size", 2.5), ("max_length", True)])
def test_runner_info_limits_are_positive_integers(field, value):
    with pytest.raises(ConfigError, match=f"RunnerInfo: {field}={value!r} must be a positive integer"):
        RunnerInfo(backend="x", quant="fp32", kv_cache=False, **{field: value})


# -- the CLI -----------------------------------------------------------------------------------------
BAD_FLAGS = {
    "--temperature nan": (["--temperature", "nan"], "--temperature nan must be a finite number >= 0"),
    "--temperature inf": (["--temperature", "inf"], "--temperature inf must be a finite number"),
    "--temperature -1": (["--temperature", "-1"], r"--temperature -1.0 must be >= 0"),
    "--top-p 0": (["--top-p", "0"], r"--top-p 0.0 must be in \(0, 1\]"),
    "--top-p nan": (["--top-p", "nan"], "--top-p nan must be a finite number"),
    "--top-k -2": (["--top-k", "-2"], "--top-k -2 must be an integer >= 0"),
    "--seed -1": (["--seed", "-1"], r"--seed -1 must be an integer >= 0 \(leave it out for a fresh random seed\)"),
    "--max-new-tokens -1": (["--max-new-tokens", "-1"], "--max-new-tokens -1 must be an integer >= 0"),
    '--stop ""': (["--stop", ".", "--stop", ""], "--stop '' is empty"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_generate_flags_exit_2_with_one_line(nano_checkpoint, capsys, case):
    flags, pattern = BAD_FLAGS[case]
    assert main(["generate", str(nano_checkpoint), "--prompt", "Once", *flags]) == 2
    captured = capsys.readouterr()
    message, _, hint = captured.err.partition("\nHINT: ")
    assert message.startswith("error: ") and "\n" not in message and hint.strip(), captured.err
    assert re.search(pattern, message), message
    assert "Traceback" not in captured.err and captured.out == ""


def test_prompt_longer_than_the_model_exits_2(artifacts, nano_checkpoint, capsys):
    for path in (nano_checkpoint, artifacts["onnx"]):
        assert main(["generate", str(path), "--prompt", "the cat sat " * 200, "--max-new-tokens", "4"]) == 2
        err = capsys.readouterr().err
        assert "error: prompt has" in err and "more than this model's max_length=256" in err and "Traceback" not in err


def test_valid_flags_still_generate(nano_checkpoint, capsys):
    assert main(["generate", str(nano_checkpoint), "--prompt", "Once", "--max-new-tokens", "0", "--seed", "0"]) == 0
    assert capsys.readouterr().out == "Once\n"


# -- property-based: nothing but a DeploykitError, whatever forward and feed are given -----------------
_scalars = st.one_of(st.integers(-5, VOCAB + 5), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                     st.booleans(), st.none(), st.text(max_size=3), st.binary(max_size=3))
_nested = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=24)
_dtypes = st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(), hnp.boolean_dtypes(),
                    hnp.complex_number_dtypes(), hnp.unicode_string_dtypes(max_len=3), hnp.datetime64_dtypes())
_arrays = hnp.arrays(_dtypes, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
_valid = st.integers(1, 3).flatmap(lambda b: st.integers(1, 12).flatmap(
    lambda t: hnp.arrays(np.int64, (b, t), elements=st.integers(0, VOCAB - 1))))
_tensors = _arrays.filter(lambda a: a.dtype.kind in "iufb").map(
    lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))))  # torch: native order only
ANY_INPUT = st.one_of(_nested, _arrays, _tensors,
                      _valid, _valid.map(lambda a: a[0].tolist()), _valid.map(torch.from_numpy))


def check_any_input(runner: Runner, value) -> None:
    try:
        logits = runner.forward(value)
    except DeploykitError:
        pass
    else:
        shape = np.asarray(value).shape
        shape = (1, *shape) if len(shape) == 1 else shape
        assert logits.shape == (*shape, VOCAB) and logits.dtype == np.float32 and np.isfinite(logits).all()
    session = runner.new_session()
    try:
        last = session.feed(value)
    except DeploykitError:
        assert session.length == 0
    else:
        assert last.shape == (VOCAB,) and np.isfinite(last).all() and session.length == len(value)


FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(FUZZ, max_examples=40)
@given(value=ANY_INPUT)
def test_fuzz_forward_and_feed(runner, value):
    check_any_input(runner, value)


@pytest.mark.slow
@settings(FUZZ, max_examples=500)
@given(value=ANY_INPUT)
def test_fuzz_forward_and_feed_long(runner, value):
    check_any_input(runner, value)
