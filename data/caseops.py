"""CaseOps: a lossless case transform applied to text before SentencePiece.

Capital letters cost a tokenizer dearly: "The", "THE" and "the" are three pieces. CaseOps writes
every maximal run of ASCII letters in lower case, with an operator in front saying how to restore
it (the scheme of the challenge's PRs #1729 and #1736, as #1855 and #2135 trained on it):

    lower case run          unchanged                       "the"      -> "the"
    upper case, >= 2        ALLCAPS + lower case            "NASA"     -> ALLCAPS "nasa"
    capital, then lower     TITLE + lower case              "The", "I" -> TITLE "the", TITLE "i"
    anything else           TITLE if the first letter is a  "McDonald" -> TITLE "mc" CAPNEXT "donald"
                            capital, CAPNEXT before every   "iPhone"   -> "i" CAPNEXT "phone"
                            later capital

The operators are the private-use characters U+E001..U+E003; a literal operator character (or
ESC, U+E004) in the text is written ESC + the character. Everything else, non-ASCII letters
included, passes unchanged, so `decode(encode(t)) == t` for every string.

The score stays on the original text: `original_byte_weights` says, for every UTF-8 byte of the
transformed text, whether it is a byte of the original (1) or of an operator (0), and the build
writes each validation token's sum of them as a sidecar shard next to the token shard.
"""

import re

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)


class CaseOpsError(ValueError):
    """Text that no original text encodes to."""


_ENCODE_UNITS = re.compile("[A-Za-z]+|[\ue001-\ue004]")
# Decoding reads: ESC + any character | an optional TITLE/ALLCAPS, then letters each with an
# optional CAPNEXT | a stray operator (an error).
_DECODE_UNITS = re.compile("\ue004(.)|([\ue001\ue002]?)((?:\ue003?[a-z])+)|([\ue001-\ue004])", re.DOTALL)


def _encode_run(run: str) -> str:
    if run.islower():
        return run
    lower = run.lower()
    if len(run) >= 2 and run.isupper():
        return ALLCAPS + lower
    if run[0].isupper() and (len(run) == 1 or run[1:].islower()):
        return TITLE + lower
    head = TITLE if run[0].isupper() else ""
    return head + lower[0] + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in run[1:])


def encode(text: str) -> str:
    """The CaseOps form of `text`."""
    return _ENCODE_UNITS.sub(lambda m: ESC + m.group() if m.group() in OPERATORS else _encode_run(m.group()), text)


def _decode_unit(m: re.Match) -> str:
    escaped, mode, letters, stray = m.groups()
    if stray is not None:
        raise CaseOpsError(f"operator U+{ord(stray):04X} at character {m.start()} is not followed by what it needs")
    if escaped is not None:
        if escaped not in OPERATORS:
            raise CaseOpsError(f"ESC at character {m.start()} escapes {escaped!r}, which is not an operator")
        return escaped
    if mode == ALLCAPS:
        if CAPNEXT in letters:
            raise CaseOpsError(f"CAPNEXT inside an ALLCAPS run at character {m.start()}")
        return letters.upper()
    if letters[0] == CAPNEXT:
        raise CaseOpsError(f"CAPNEXT on the first letter of a run at character {m.start()}")
    out = re.sub("\ue003([a-z])", lambda c: c.group(1).upper(), letters)
    return out[0].upper() + out[1:] if mode == TITLE else out


def decode(text: str) -> str:
    """The original text of a CaseOps string; CaseOpsError if no text encodes to it."""
    return _DECODE_UNITS.sub(_decode_unit, text)


def original_byte_weights(transformed: str) -> np.ndarray:
    """(UTF-8 length of `transformed`,) uint8: 1 for each byte that is a byte of the original text, 0
    for the bytes of operators and of ESC (an escaped operator is original text: its 3 bytes count).
    Its sum is len(decode(transformed).encode())."""
    data = np.frombuffer(transformed.encode("utf-8"), dtype=np.uint8)
    weights = np.ones(len(data), dtype=np.uint8)
    # U+E001..U+E004 are EE 80 81..84 in UTF-8; 0xEE is never a continuation byte, so these three
    # bytes are found only where an operator is.
    starts = np.flatnonzero((data[:-2] == 0xEE) & (data[1:-1] == 0x80) & (data[2:] >= 0x81) & (data[2:] <= 0x84))
    literal_at = -1
    for p in starts.tolist():
        if p == literal_at:  # the operator an ESC escaped: original text
            continue
        weights[p:p + 3] = 0
        if data[p + 2] == 0x84:  # ESC
            literal_at = p + 3
    return weights
