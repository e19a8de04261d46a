"""Targets over answer strings: {"heads": 0.5, "tails": 0.5}, the numbers 1-10, a skewed yes/no.

A distribution over answer *strings* meets the optimisers, which match a next-token distribution,
through the prefix tree (trie) of the answers' tokenisations:

- `answer_targets`: the next-token target is the marginal over first tokens (answers sharing a
  first token, such as "1" and "10", pool their mass on it; `first_token_shared` says so).
- `score_strings`: the distribution a prompt induces over the full strings, exact: the model's
  conditionals are chained along every path of the trie (one batched forward per call, log-probs
  after every answer position), so P(answer) = Π P(token | frame, prompt, earlier tokens) times the
  probability of ending there (below). What is left is `mass_outside`, the mass off the answer set.

What an answer is, stated once:
- **Its form is the string as given, in its canonical tokenisation**: the tokens the tokenizer gives
  for it where it stands, right after the frame's suffix text (so a tokenizer that merges across that
  boundary is caught, and a SentencePiece dummy prefix is not mistaken for the answer). Other token
  sequences that decode to the same string (a model almost never emits them) count as off the set.
- **Other forms** of an answer (`other_forms`: the leading-space toggle " 7" / "7" and the
  capitalisation toggle "Yes" / "yes", where they are not answers themselves) are scored the same way
  and reported as `mass_other_forms` (part of `mass_outside`): an instruct model that says "Heads"
  when "heads" was meant loses that mass, and the report says where it went.
- **Where an answer ends** (`stop`): with `stop="word"` (the default) an answer counts when the token
  after it starts a new word: its text is empty (special tokens, e.g. the end of the turn) or starts
  with a character that is not a letter or digit ("7." and "7<|im_end|>" are "7"; "75" is not), and it
  does not continue into a longer answer ("1" then "0" is "10"). With `stop=None` a continuation counts
  for the deepest answer whose tokens it begins with, whatever follows ("15" counts as "1"). With a
  list of one-token strings (e.g. ["<|im_end|>"]) an answer counts only when one of them follows it:
  the strictest, for a model that should say nothing else. Each gives disjoint events, so the answer
  probabilities and mass_outside sum to 1.

`score_prompts` / `score_result` apply `score_strings` to every target of a batch and give a tidy
table; `answers_kl` is KL(target ‖ induced) over the answers and the "outside" event, in nats.

The parts: `sets` (answer sets, their forms and next-token targets), `strings` (scoring strings).
"""

from .sets import AnswerSet, answer_set, answer_targets, other_forms
from .strings import StringScores, answers_kl, score_prompts, score_result, score_strings

__all__ = ["AnswerSet", "StringScores", "answer_set", "answer_targets", "answers_kl", "other_forms",
           "score_prompts", "score_result", "score_strings"]
