"""What dplib reads from a causal LM, in one place: the only package that knows how a model is built.

Every optimiser, bound and target builder asks this package for what it needs (import the names
from `dplib.lm`; the modules below are its parts, bottom to top):

- `config`: `ModelStructureError`, the pieces supplied with `configure`, `text_config`.
- `tokens`: `special_ids` / `allowed_tokens`, the ids a real prompt may not / may use.
- `head`: `output_layer(model)`: logits = softcap(scale · (W h + b)) for the final-norm output h,
  with every transform the family applies to its logits read from the config *by meaning*
  (`LOGIT_TRANSFORMS`: Cohere's multiplier `logit_scale`, Granite's divisor `logits_scaling`,
  Gemma-2's `final_logit_softcapping`); a config field that looks like another logit transform is
  refused, never ignored. `logits_width(model)`: the width of the next-token logits (can exceed
  `len(tokenizer)`).
- `decoder`: `body(model)`, the decoder without its head (inputs_embeds → final-norm hidden states);
  `embed` / `embedding_matrix`, the input embedding as s · E[ids]; `max_positions(model)`, the
  position limit (None where the config states none, e.g. ALiBi), and `check_length`.
- `forward`: `last_hidden` / `next_token_logprobs`, the hot path: the body, then the head on the
  last position only, as one 2-D matmul; `last_hidden_after` / `continuation_logprobs`, a shared
  context run once for many rows (`cache_kwarg` / `output_cache`: the key/value cache's name in this
  transformers release); `kl_from_logprobs`.
- `norms`: `final_norm(model)` / `norm_spec(model)`, the final normalisation module, located under
  the names families use and *checked* to be what produces the body's output, then described by
  calling it (RMSNorm, Gemma's 1 + w, LayerNorm with or without affine parameters); `layers(model)`,
  the decoder's layer list.
- `frames`: `PromptFrame` / `prompt_frame`, the one rule for what surrounds a prompt (BOS, prefix
  and suffix text, or the chat template with prefix "chat": `chat_frame`), used identically by
  soft, hard, layer_bound, `reference`, `from_model` and scoring.
- `identity`: `fingerprint(model)`, the identity of a model's weights and dtype (for caching results).
- `verify`: `check(model)` and `configure(model, ...)`.

The first call on a model checks the fast path against the model's own full forward
(`model(input_ids).logits`) on a short probe: a family with a piece dplib does not know fails there
with an error naming the piece, instead of giving a wrong number. Anything dplib cannot find can be
supplied with `configure(model, ...)` (see its docstring); the error messages say which argument.

Patching `dplib.lm.<name>` in a test reaches the callers that look it up as `lm.<name>` (e.g.
`optim.hard`'s `lm.last_hidden_after`); a call made through an imported name, or between the modules
here, is reached by patching the module that makes it (e.g. `dplib.lm.forward.body`).
"""

from __future__ import annotations

from .config import ModelStructureError, text_config
from .decoder import body, check_length, embed, embedding_matrix, max_positions
from .forward import (
    cache_kwarg,
    continuation_logprobs,
    kl_from_logprobs,
    last_hidden,
    last_hidden_after,
    next_token_logprobs,
    output_cache,
)
from .frames import CHAT, ChatTemplateError, PromptFrame, bos_id, chat_frame, prompt_frame
from .head import LOGIT_TRANSFORMS, OutputLayer, logits_width, output_layer
from .identity import fingerprint
from .norms import NormSpec, final_norm, layers, norm_spec
from .tokens import allowed_tokens, special_ids
from .verify import check, configure

__all__ = [
    "CHAT", "LOGIT_TRANSFORMS", "ChatTemplateError", "ModelStructureError", "NormSpec", "OutputLayer", "PromptFrame",
    "allowed_tokens", "body", "bos_id", "cache_kwarg", "chat_frame", "check", "check_length", "configure", "embed", "embedding_matrix", "final_norm", "fingerprint", "kl_from_logprobs",
    "last_hidden", "last_hidden_after", "layers", "logits_width", "max_positions", "next_token_logprobs", "norm_spec",
    "continuation_logprobs", "output_cache", "output_layer", "prompt_frame", "special_ids", "text_config",
]
