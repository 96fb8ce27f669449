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


class TextStream:
    """A completion's text for its stop strings and its stream: `update` says whether the token just added completes
    a stop string; `new_text` is the text no stop string can still claim (the final text is cut before the stop
    string, so up to `hold` characters wait until the next token or the end)."""

    def __init__(self, tokenizer, start: int, stop: tuple[str, ...]):
        self.decoder = IncrementalDecoder(tokenizer, start)
        self.stop = stop
        self.hold = max(map(len, stop), default=1) - 1
        self.sent = 0  # characters already returned by new_text

    def update(self, ids: list[int]) -> bool:
        """Decode the latest token of ids (every token so far); True when its text completes a stop string (the text
        before it was searched at earlier calls)."""
        piece = self.decoder.update(ids)
        if not piece or not self.stop:
            return False
        tail = self.decoder.text[-(len(piece) + self.hold):]
        return any(s in tail for s in self.stop)

    def new_text(self, final: str | None = None) -> str:
        """The text since the last call; given the final text, all of the rest of it."""
        text = self.decoder.text if final is None else final
        ready = len(text) if final is not None else max(self.sent, len(text) - self.hold)
        piece, self.sent = text[self.sent:ready], ready
        return piece
