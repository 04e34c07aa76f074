"""Speculative decoding from the prompt (prompt lookup): a row drafts the tokens that followed the last time its
latest few tokens appeared in its own text, and the model checks the draft in one forward.

A decode step reads every weight to produce one token per row. A draft of k tokens is fed with the row's last token as
one chunk of k + 1: the logits at each of its positions are what a decode step there would have given, since the
positions before it hold exactly the draft so far. The row keeps the longest prefix of the draft the model agrees with,
and then the model's own token at the first disagreement (or after the whole draft): 1 to k + 1 tokens for one read of
the weights. The positions of the rejected drafts are then taken back (cache.rewind), which the rolling cache allows
by keeping `spare` slots beyond the window (mistral/cache.py says why and how).

    text ... the cat sat on the mat . the cat      last 3 tokens "the cat" were seen before, followed by "sat on"
    draft [sat, on]; feed [cat, sat, on]           the model's picks at those positions: [sat, on, a]
    keep sat, on, a                                three tokens for one forward; nothing to take back

Greedy, a token is agreed to when it is the argmax there: the ids are exactly those of plain decoding. Sampling, the
draft token d is kept with the probability p(d) the model gives it, and on rejection the token is drawn from p without
d, renormalised; each kept token is then distributed exactly as p (the draft is a point mass, so this is speculative
sampling's min(1, p/q) rule with q(d) = 1).

A row whose drafts keep failing drafts fewer tokens, and after rejections of every draft token waits a growing number
of steps before drafting again (1, 2, 4, ... 32): on text that never repeats, a row decodes as it would without.
"""
import torch

NGRAMS = (3, 2, 1)  # the lengths of the suffix matched, longest first
MOST_WAIT = 32  # steps a row waits before drafting again, at most, after failed drafts


class Drafter:
    """One row's drafts: its text (prompt and generated tokens), indexed by every n-gram's latest occurrence with a
    token after it, and how many tokens it drafts now."""

    def __init__(self, tokens: list[int], most: int):
        assert most >= 1, most
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> where the token after its latest occurrence is
        self.most, self.length = most, most
        self.wait, self.backoff = 0, 1  # steps left before the next draft; the wait after the next total rejection
        self.kept = False  # whether a draft token of this row has been kept yet
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the n-grams that end here have `token` after them now
            for n in NGRAMS:
                if end >= n:
                    self.index[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def draft(self, room: int) -> list[int]:
        """Up to min(self.length, room) tokens that followed the latest earlier occurrence of the text's last n
        tokens (n = 3, 2, 1, longest first); [] when none occurred, or while the row waits after failed drafts. A
        match of one token is weak evidence (in text that never repeats, tokens recur by chance): it drafts one
        token, and only once a draft of this row has been kept."""
        if self.wait:
            self.wait -= 1
            return []
        k, end = min(self.length, room), len(self.tokens)
        if k < 1:
            return []
        for n in NGRAMS:
            at = self.index.get(tuple(self.tokens[end - n :])) if end >= n else None
            if at is not None and (n > 1 or self.kept):
                return self.tokens[at : at + (k if n > 1 else 1)]
        return []

    def verified(self, drafted: int, accepted: int) -> None:
        """After a draft of `drafted` tokens of which the model kept `accepted`: a draft wholly kept lets the next
        be one longer; a partly kept one makes the next as long as what was kept, and one more; one wholly rejected
        also makes the row wait before drafting again, twice as long each time it happens in a row."""
        self.kept = self.kept or accepted > 0
        if accepted == drafted:
            self.length = min(self.most, self.length + 1)
            self.backoff = 1
        elif accepted:
            self.length = accepted + 1
            self.backoff = 1
        else:
            self.length = 1
            self.wait, self.backoff = self.backoff, min(2 * self.backoff, MOST_WAIT)


def accept_sampled(probs: torch.Tensor, draft: list[int], generator: torch.Generator | None) -> list[int]:
    """The tokens a sampling row keeps from a verified draft: probs (k + 1, V), the distribution sampling draws from
    at each position of the chunk (the last token's, then each draft token's). Draft token i is kept with probability
    probs[i, d_i]; at the first rejection, the token is drawn from probs[i] without d_i, renormalised, and the rest
    is dropped; when all k are kept, one more is drawn from probs[k]. 1 to k + 1 tokens."""
    assert probs.shape[0] == len(draft) + 1, (probs.shape, len(draft))
    kept = []
    for i, d in enumerate(draft):
        u = torch.rand((), generator=generator, device=probs.device)
        if u < probs[i, d]:
            kept.append(d)
            continue
        rest = probs[i].clone()
        rest[d] = 0
        if rest.sum() <= 0:  # top_k or top_p left d alone, its probability rounded just below u: d it is
            kept.append(d)
            continue
        kept.append(int(torch.multinomial(rest, 1, generator=generator)))
        return kept
    kept.append(int(torch.multinomial(probs[len(draft)], 1, generator=generator)))
    return kept
