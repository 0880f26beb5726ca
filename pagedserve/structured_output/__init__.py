"""Structured outputs: constraints on generated text (JSON schema, regex, choice, grammar).

- :mod:`.grammar` turns :class:`~pagedserve.sampling_params.StructuredOutputsParams` into
  an llguidance grammar and validates it (no tokenizer needed: the API process rejects bad
  schemas, regexes and grammars with a 400 before the engine sees them).
- :mod:`.manager` (engine core) compiles each grammar once against the model's vocabulary,
  gives each constrained request a matcher, fills the step's token bitmask for the
  requests that sample, and advances the matchers with the sampled tokens.
- :func:`.bitmask.apply_token_bitmask` masks the logits rows before sampling (model runner).

llguidance does the grammar work (no dependencies, ~0.4 ms to fill 16 rows of a 262k
vocabulary); a request without constraints pays nothing.
"""
