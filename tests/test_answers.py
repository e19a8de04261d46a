"""Tests for dplib.answers (answer-string targets, score_strings), the chat-template prompt frame
(lm.chat_frame, prefix="chat" in every optimiser) and dplib.proposers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dplib import answers, lm, proposers
from dplib.models import tiny_tokenizer
from dplib.optim import HardConfig, SoftConfig, optimize_hard, optimize_soft, score_prompt_text
from dplib.targets import TargetError

# role, content and an end-of-turn marker, BOS rendered as text (as Gemma's and SmolLM2's templates do)
TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['role'] }}:\n{{ message['content'] }}"
            "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}assistant:\n{% endif %}")
QUICK_HARD = dict(prompt_length=3, steps=4, top_k=16, n_candidates=12, patience=0)


@pytest.fixture(scope="module")
def chat_tok():
    """A fresh tiny tokenizer (the session fixture's is shared, so never mutated) with a chat template."""
    tok = tiny_tokenizer(380)
    tok.chat_template = TEMPLATE
    return tok


def _render_ids(tok, content: str) -> list[int]:
    """The conversation as Hugging Face tokenises it: the template's text, no special tokens added."""
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _full_forward_kl(model, ids, target_probs) -> float:
    """KL(target ‖ model) at the last position through the model's own full forward."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    p = target_probs.float()
    return float((torch.special.xlogy(p, p) - p * logprobs).sum())


# ------------------------------------------------------------------ answer sets


@pytest.mark.parametrize("dist, match", [
    ({}, "empty"),
    ([("a", 0.5), ("a", 0.5)], "more than once"),
    ({"": 1.0}, "non-empty"),
    ({"a": -0.1, "b": 1.1}, "≥ 0"),
    ({"a": math.nan, "b": 1.0}, "finite"),
    ({"a": 0.5, "b": 0.4}, "sum to 0.9"),
])
def test_answer_set_errors(dist, match):
    with pytest.raises(TargetError, match=match):
        answers.answer_set(dist)


def test_other_forms():
    forms = answers.other_forms(["yes", "No", "7", " 8"])
    assert forms == {" yes": "yes", "Yes": "yes", " Yes": "yes", " No": "No", "no": "No", " no": "No",
                     " 7": "7", "8": " 8"}
    assert " 7" not in answers.other_forms(["7", " 7"])  # a form that is an answer is scored as one


# ------------------------------------------------------------------ next-token targets


def test_answer_targets_first_token_marginal(tiny):
    model, tok = tiny
    tasks = {"coin": {"the": 0.25, "value": 0.75}, "nums": {"1": 0.5, "12": 0.3, "2": 0.2}}
    targets = answers.answer_targets(model, tok, tasks, prefix="bos")
    assert targets.vocab_size == lm.logits_width(model) and targets.ids == ["answers-coin", "answers-nums"]
    enc = {a: tok.encode(a, add_special_tokens=False) for a in ("the", "value", "1", "12", "2")}
    assert len(enc["12"]) == 2 and enc["12"][0] == enc["1"][0]  # a multi-token answer sharing "1"'s token
    assert targets.probs[0, enc["the"][0]] == pytest.approx(0.25) and targets.probs[0, enc["value"][0]] == pytest.approx(0.75)
    assert targets.probs[1, enc["1"][0]] == pytest.approx(0.8) and targets.probs[1, enc["2"][0]] == pytest.approx(0.2)
    meta = targets.meta.set_index("task")
    assert meta.loc["nums", "first_token_shared"] and not meta.loc["coin", "first_token_shared"]
    assert json.loads(meta.loc["nums", "answers"]) == tasks["nums"]


def test_answer_targets_tokenise_after_the_frame(tiny):
    model, tok = tiny
    targets = answers.answer_targets(model, tok, {"t": {"the": 1.0}}, prefix="bos", suffix=" is")
    assert targets.probs[0, tok.encode("the", add_special_tokens=False)[0]] == 1.0
    # after a suffix ending in a space, "the" merges with it (" the" is one token): not a continuation
    with pytest.raises(TargetError, match="merges"):
        answers.answer_targets(model, tok, {"t": {"the": 1.0}}, prefix="bos", suffix="of ")


# ------------------------------------------------------------------ score_strings against brute force


def _continuations(model, context_ids: list[int], depth: int):
    """Every continuation of `depth` ≤ 2 tokens over the whole logits width, with its probability,
    through the model's own full forward: {(t1,) or (t1, t2): p}."""
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([context_ids])).logits[0, -1].double(), -1)
        if depth == 1:
            return {(a,): float(first[a]) for a in range(len(first))}
        width = len(first)
        batch = torch.tensor([[*context_ids, a] for a in range(width)])
        second = torch.softmax(model(batch).logits[:, -1].double(), -1)  # (width, width)
    joint = first[:, None] * second
    return joint


@pytest.mark.parametrize("fixture", ["tiny", "tiny_gemma"])
def test_score_strings_matches_brute_force_enumeration(fixture, request):
    """stop=None: every 2-token continuation counts for the deepest answer it begins with."""
    model, tok = request.getfixturevalue(fixture)
    dist = {"1": 0.4, "12": 0.3, "the": 0.2, "value": 0.1}
    paths = {a: tuple(tok.encode(a, add_special_tokens=False)) for a in dist}
    assert max(map(len, paths.values())) == 2 and len(paths["12"]) == 2
    prompt = "of the"
    frame = lm.prompt_frame(model, tok, "bos", "")
    joint = _continuations(model, frame.encode(prompt), 2)  # (width, width)
    expected = {}
    for a, p in paths.items():
        if len(p) == 2:
            expected[a] = float(joint[p[0], p[1]])
        else:  # begins with the token, and the second token does not make a longer answer
            longer = [q[1] for q in paths.values() if len(q) == 2 and q[0] == p[0]]
            keep = torch.ones(joint.shape[1], dtype=torch.bool)
            keep[longer] = False
            expected[a] = float(joint[p[0], keep].sum())
    scores = answers.score_strings(model, tok, prompt, dist, prefix="bos", stop=None, forms=False)
    torch.testing.assert_close(scores.probs, torch.tensor([expected[a] for a in dist], dtype=torch.float64),
                               rtol=1e-5, atol=1e-9)
    assert scores.mass_outside == pytest.approx(1 - sum(expected.values()), abs=1e-6)
    q = torch.tensor([expected[a] for a in dist], dtype=torch.float64)
    p = torch.tensor(list(dist.values()), dtype=torch.float64)
    assert scores.kl() == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)


def test_score_strings_stop_and_word_end_match_enumeration(tiny):
    """stop=[tokens] and stop="word" on one-token answers: the next token must end the answer."""
    model, tok = tiny
    dist = {" the": 0.5, "x": 0.5}
    frame = lm.prompt_frame(model, tok, "bos", "")
    joint = _continuations(model, frame.encode("of"), 2)
    ids = [tok.encode(a, add_special_tokens=False) for a in dist]
    assert all(len(i) == 1 for i in ids)
    ids = [i[0] for i in ids]
    stop_ids = [tok.eos_token_id, tok.encode(".", add_special_tokens=False)[0]]
    by_stop = answers.score_strings(model, tok, "of", dist, prefix="bos", stop=["<eos>", "."], forms=False)
    torch.testing.assert_close(by_stop.probs, joint[ids][:, stop_ids].sum(1), rtol=1e-5, atol=1e-10)
    # a word ends where the next token's text does not start with a letter or digit (or is empty/special);
    # a token that is part of a UTF-8 character (decodes alone to U+FFFD) continues the word
    width = joint.shape[1]
    texts = [tok.decode([i]) if i < len(tok) else "" for i in range(width)]
    ends = torch.tensor([i >= len(tok) or i in lm.special_ids(tok) or not texts[i]
                         or not (texts[i][0].isalnum() or texts[i][0] == "\ufffd") for i in range(width)])
    by_word = answers.score_strings(model, tok, "of", dist, prefix="bos", forms=False)
    torch.testing.assert_close(by_word.probs, joint[ids][:, ends].sum(1), rtol=1e-5, atol=1e-10)
    assert (by_word.probs < answers.score_strings(model, tok, "of", dist, prefix="bos", stop=None,
                                                  forms=False).probs).all()
    with pytest.raises(ValueError, match="exactly one token"):
        answers.score_strings(model, tok, "of", dist, prefix="bos", stop=["the value"])


def test_score_strings_prompt_as_text_ids_or_embeddings(tiny):
    model, tok = tiny
    dist = {"the": 0.5, "value": 0.5}
    ids = tok.encode("of the", add_special_tokens=False)
    by_text = answers.score_strings(model, tok, "of the", dist, prefix="bos")
    by_ids = answers.score_strings(model, tok, ids, dist, prefix="bos")
    by_embeds = answers.score_strings(model, tok, lm.embed(model, torch.tensor(ids)), dist, prefix="bos")
    torch.testing.assert_close(by_ids.probs, by_text.probs)
    torch.testing.assert_close(by_embeds.probs, by_text.probs)
    assert by_text.forms and set(by_text.forms) == set(answers.other_forms(list(dist)))
    total = sum(p for _, p in by_text.forms.values())
    assert by_text.mass_other_forms == pytest.approx(total) and total <= by_text.mass_outside + 1e-12
    assert answers.score_strings(model, tok, "of", ["the", "value"], prefix="bos").target is None


# ------------------------------------------------------------------ the chat frame


def test_chat_frame_splits_the_template_without_doubling_bos(tiny, chat_tok):
    model, _ = tiny
    frame = lm.prompt_frame(model, chat_tok, "chat", " Answer:")
    assert frame.special == (chat_tok.bos_token_id,) and "<bos>" not in frame.prefix_text
    assert frame.prefix_text == "user:\n" and frame.suffix_text == " Answer:<eos>\nassistant:\n"
    for text in ("flip a coin", " the value", "x"):
        assert frame.encode(text) == _render_ids(chat_tok, text + " Answer:")
        assert frame.encode(text).count(chat_tok.bos_token_id) == 1


def test_chat_frame_errors(tiny):
    model, tok = tiny
    with pytest.raises(lm.ChatTemplateError, match="chat_template"):
        lm.prompt_frame(model, tok, "chat")
    trimming = tiny_tokenizer(380)
    trimming.chat_template = TEMPLATE.replace("message['content']", "message['content'] | trim")
    with pytest.raises(lm.ChatTemplateError, match="trims"):
        lm.prompt_frame(model, trimming, "chat")


@pytest.mark.parametrize("fixture", ["tiny", "tiny_gemma"])
def test_hard_in_chat_reports_the_kl_of_the_rendered_conversation(fixture, chat_tok, request):
    model, _ = request.getfixturevalue(fixture)
    targets = answers.answer_targets(model, chat_tok, {"coin": {"the": 0.5, "value": 0.5},
                                                       "n": {"1": 0.6, "12": 0.4}}, prefix="chat")
    res = optimize_hard(model, chat_tok, targets, HardConfig(**QUICK_HARD, prefix="chat"), progress=False)
    for i, text in enumerate(res.prompt_text):
        assert text is not None
        kl = _full_forward_kl(model, _render_ids(chat_tok, text), targets.probs[i])
        assert kl == pytest.approx(float(res.kl[i]), abs=1e-4)
    kl, _ = score_prompt_text(model, chat_tok, res.prompt_text, targets, prefix="chat")
    assert (kl - res.kl).abs().max() <= 1e-4


def test_soft_in_chat_reports_the_kl_of_the_conversation(tiny, chat_tok):
    model, _ = tiny
    targets = answers.answer_targets(model, chat_tok, {"coin": {"the": 0.5, "value": 0.5}}, prefix="chat")
    res = optimize_soft(model, chat_tok, targets, SoftConfig(prompt_length=2, steps=5, prefix="chat"), progress=False)
    # the frame's ids, read independently off the template's tokenisation around a one-token message
    probe = chat_tok.encode("x", add_special_tokens=False)
    ids = _render_ids(chat_tok, "x")
    cut = ids.index(probe[0])
    pre, post = torch.tensor(ids[:cut]), torch.tensor(ids[cut + 1:])
    embeds = torch.cat([lm.embed(model, pre), res.prompt_embeds[0], lm.embed(model, post)])[None]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(inputs_embeds=embeds).logits[0, -1].float(), -1)
    assert float(lm.kl_from_logprobs(targets.probs[0], logprobs)) == pytest.approx(float(res.kl[0]), abs=1e-4)
    # and the string-level scores of the soft prompt are those of the same embeddings
    table = answers.score_result(model, chat_tok, res, targets)
    direct = answers.score_strings(model, chat_tok, res.prompt_embeds[0], {"the": 0.5, "value": 0.5}, prefix="chat")
    assert table["model_prob"].tolist() == pytest.approx(direct.probs.tolist())


# ------------------------------------------------------------------ warm starts and the comparison


def test_init_text_sets_the_prompt_length(tiny, chat_tok):
    model, _ = tiny
    targets = answers.answer_targets(model, chat_tok, {"a": {"the": 1.0}, "b": {"value": 1.0}}, prefix="chat")
    texts = ("of the", "the of")
    assert {len(chat_tok.encode(t, add_special_tokens=False)) for t in texts} == {3}
    res = optimize_hard(model, chat_tok, targets, HardConfig(**{**QUICK_HARD, "prompt_length": None},
                                                            init_text=texts, prefix="chat"), progress=False)
    assert res.prompt_ids.shape == (2, 3) and res.meta["config"]["prompt_length"] == 3
    kl, _ = score_prompt_text(model, chat_tok, list(texts), targets, prefix="chat")
    torch.testing.assert_close(res.initial_kl, kl, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="prompt_length=None"):
        HardConfig(prompt_length=None)
    with pytest.raises(ValueError, match="different lengths"):
        optimize_hard(model, chat_tok, targets, HardConfig(prompt_length=None, init_text=("of the", "value of the")),
                      progress=False)
    with pytest.raises(ValueError, match="one text per"):
        optimize_hard(model, chat_tok, targets, HardConfig(prompt_length=None, init_text=("of the",)), progress=False)


def test_proposers_compare_end_to_end(tiny, chat_tok):
    from dplib.optim import free_bound

    model, _ = tiny
    tasks = {"coin": {"the": 0.5, "value": 0.5}, "n": {"1": 0.5, "12": 0.5}}
    targets = answers.answer_targets(model, chat_tok, tasks, prefix="chat")
    instructions = {"coin": ["of the value", "say the"], "n": ["value of the"]}  # 6, 4 and 4 tokens
    base, base_dist = proposers.instruction_baselines(model, chat_tok, targets, instructions)
    assert len(base) == 3 and set(base["method"]) == {"instruction"}
    kl, _ = score_prompt_text(model, chat_tok, ["say the"], targets[[0]], prefix="chat")
    assert base.set_index("prompt_text").loc["say the", "kl_nats"] == pytest.approx(float(kl[0]))
    best = proposers.best_instructions(base)
    assert set(best) == set(targets.ids)
    hard = proposers.warm_started_hard(model, chat_tok, targets, best, HardConfig(**QUICK_HARD, prefix="chat"),
                                       progress=False)
    lengths = {len(chat_tok.encode(t, add_special_tokens=False)) for t in best.values()}
    assert len(hard) == len(lengths) and sorted(t for r in hard for t in r.target_ids) == sorted(targets.ids)
    soft = optimize_soft(model, chat_tok, targets, SoftConfig(prompt_length=2, steps=3, prefix="chat"), progress=False)
    summary, dist = proposers.compare(model, chat_tok, targets, [*hard, soft, free_bound(model, chat_tok, targets)],
                                      base, base_dist)
    assert summary.groupby("method").size().to_dict() == {"instruction": 2, "hard": 2, "soft": 2, "free_bound": 2}
    prompts = summary[summary["method"] != "free_bound"]
    assert not prompts[["kl_nats", *proposers.STRING_COLUMNS]].isna().any().any()
    assert summary.loc[summary["method"] == "free_bound", "kl_answers_nats"].isna().all()
    for _, part in dist.groupby(["target_id", "source"]):
        assert part["prob"].sum() == pytest.approx(1.0, abs=1e-6)  # answers + outside
    assert set(dist["source"]) == {"target", "instruction", "hard", "soft"}


# ------------------------------------------------------------------ the real tokenizers and models


@pytest.mark.slow
def test_real_tokenizers_single_and_multi_token_answers(smollm2, gemma3):
    tasks = {"ten": {str(i): 0.1 for i in range(1, 11)}, "coin": {"heads": 0.5, "tails": 0.5}}
    for (model, tok), prefix in ((smollm2, "chat"), (gemma3, "bos")):
        targets = answers.answer_targets(model, tok, tasks, prefix=prefix)
        ten = targets.meta.set_index("task").loc["ten"]
        assert ten["first_token_shared"] and ten["n_first_tokens"] == 9  # "10" starts with "1"'s token
        one = tok.encode("1", add_special_tokens=False)[0]
        assert float(targets.probs[0, one]) == pytest.approx(0.2)
        scores = answers.score_strings(model, tok, "Pick a number from 1 to 10.", tasks["ten"], prefix=prefix)
        assert scores.probs.sum() + scores.mass_outside == pytest.approx(1.0)
        assert (scores.probs >= 0).all() and 0 <= scores.mass_other_forms <= scores.mass_outside + 1e-9
    with pytest.raises(lm.ChatTemplateError, match="chat_template"):
        lm.prompt_frame(*gemma3, "chat")


@pytest.mark.slow
def test_smollm2_chat_frame_is_the_conversation(smollm2):
    model, tok = smollm2
    frame = lm.prompt_frame(model, tok, "chat")
    assert frame.special == (tok.bos_token_id,)  # "<|im_start|>" is SmolLM2's BOS: once, as an id
    text = "Roll a fair die."
    ids = _render_ids(tok, text)
    assert frame.encode(text) == ids
    targets = answers.answer_targets(model, tok, {"die": {str(i): 1 / 6 for i in range(1, 7)}})
    kl, _ = score_prompt_text(model, tok, [text], targets, prefix="chat")
    assert float(kl[0]) == pytest.approx(_full_forward_kl(model, ids, targets.probs[0]), abs=1e-4)
