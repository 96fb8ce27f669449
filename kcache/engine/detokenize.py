"""A completion's text, decoded piece by piece as tokens arrive."""
from __future__ import annotations


class IncrementalDecoder:
    """Decodes only the last few tokens at each call: decoding the whole completion at every step would cost time
    quadratic in its length. Each call decodes the tokens since the last piece together with the ones before it (a
    token's text can depend on its neighbours), and a token that ends inside a UTF-8 character waits for the next."""

    def __init__(self, tokenizer, start: int = 0):
        self.tokenizer = tokenizer
        self.prefix = self.read = start  # token offsets: decoding context start; tokens already turned into text
        self.text = ""

    def update(self, ids: list[int]) -> str:
        """The text that ids[start:] add since the last call (ids: every token so far)."""
        before = self.tokenizer.decode(ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(ids[self.prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        piece = after[len(before):]
        self.text += piece
        self.prefix, self.read = self.read, len(ids)
        return piece
