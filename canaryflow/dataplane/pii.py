"""Mask personal data and secrets before a request's text is stored or sent to an external judge.

Hostile input must not stall anyone, so masking runs in linear time with a hard size cap:

- At most `MAX_CHARS` characters are kept. A longer text is cut at a whitespace (a number,
  secret or e-mail straddling the cut is dropped, never kept in part), masked, and marked
  `[TRUNCATED: N characters in all]`; the masked result never exceeds `MAX_CHARS` either.
- No pattern can backtrack more than a constant per character: every variable-length part is
  either bounded (`{m,n}` with small n) or starts only at the beginning of a run of its own
  characters (a one-character lookbehind), and no repeated group can split the same text two
  ways. PEM blocks are found with `str.find`-style searches, never a regex spanning the block.
  `tests/unit/test_pii.py` checks the time of 4x longer adversarial inputs grows about 4x.
- Each kind is one pass behind a cheap pre-filter (substring hints for secrets, URLs and
  e-mails; IBAN/NI numbers where two letters precede two digits; cards, phones and SSNs only
  inside spans of 7+ digits). On a long text a pass scans 4 KB slices and pauses every few
  dozen matches: `mask_pii_async` gives the event loop back between them (no step takes over
  ~2 ms of CPU on a 64 KB hostile text), `mask_pii` runs straight through. 1 KB of prose costs
  ~15 us, ~60 us with a few numbers in it, ~100-250 us dense with look-alikes or PII (2-3x the
  previous patterns, which had fewer kinds and backtracked; `benchmarks/bench_pii.py`).

Order matters: private keys and secrets first (their digits must not become phone numbers), then
URL passwords (before e-mails: `user:pw@host` is not an address), e-mails, IBANs and UK National
Insurance numbers, IP addresses, then digit spans: US SSNs, cards (Luhn-checked, so an order id
that fails the check stays) and phones.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Callable, Generator, Iterator

EMAIL = "[EMAIL]"
PHONE = "[PHONE]"
CARD = "[CARD]"
SECRET = "[SECRET]"
PRIVATE_KEY = "[PRIVATE_KEY]"
PASSWORD = "[PASSWORD]"
IBAN = "[IBAN]"
SSN = "[SSN]"
NATIONAL_ID = "[NATIONAL_ID]"
IP = "[IP]"

MAX_CHARS = 64 * 1024
"""The longest text masked and returned; anything beyond is dropped, never stored unmasked."""
ASYNC_THRESHOLD = 4096
"""`mask_pii_async` masks shorter texts in one go (tens of microseconds); longer ones in slices."""

_MARKER = "\n[TRUNCATED: {n} characters in all]"
_MARKER_ROOM = 64  # room kept for the marker under MAX_CHARS
_SLICE_MATCHES = 32  # a pass yields after this many matches
_SHORT = 4096  # a pass over a shorter text runs as one `re.sub` call, no yields
_SCAN = 4096  # a bounded pattern scans a long text in slices of this many characters

# A pass: yields to let a caller pause, returns the masked text.
_Step = Generator[None, None, str]
_Repl = str | Callable[[re.Match[str]], str]

# --------------------------------------------------------------------------- patterns

_PEM_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----")
_PEM_END = re.compile(r"-----END [A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----")

# Each secret kind starts with its literal (so the scan is a fast search for it, ~1 GB/s) and
# then looks back past it for a word boundary. Token bodies have no tail that can fail.
_SECRETS = (
    ("Bearer", re.compile(r"Bearer(?<!\wBearer)[ \t]{1,8}[A-Za-z0-9._~+/-]{8,}=*")),
    ("sk-", re.compile(r"sk-(?<!\wsk-)[A-Za-z0-9_-]{16,}")),  # OpenAI/Anthropic (checked)
    ("AKIA", re.compile(r"AKIA(?<!\wAKIA)[0-9A-Z]{16}\b")),  # AWS access key ids
    ("ASIA", re.compile(r"ASIA(?<!\wASIA)[0-9A-Z]{16}\b")),
    ("gh", re.compile(r"gh[pousr]_(?<!\w.{4})[A-Za-z0-9]{30,}\b")),  # GitHub tokens
    ("github_pat_", re.compile(r"github_pat_(?<!\wgithub_pat_)[A-Za-z0-9_]{22,}")),
    ("xox", re.compile(r"xox[abposr]-(?<![\w-].{5})[A-Za-z0-9-]{10,}")),  # Slack tokens
    # JWT: three base64url parts, the header (and usually the payload) opening with '{"'
    ("eyJ", re.compile(r"eyJ(?<![\w.-]eyJ)[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")),
)
_SK_BODY = re.compile(r"[A-Za-z0-9_]{16}")  # an sk- key has one run of 16+ such characters

# scheme://user:password@host: from "://", the user stops at ':' and the password at '@'.
_URL_PASSWORD = re.compile(r"://([^\s:/?#@\[\]]{0,128}):[^\s/?#@]{1,256}@")

# The local part may only start where a run of its characters starts: one scan per run.
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@"
    r"[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}"
)

# IBAN (length per country and mod-97 checked in Python) or UK National Insurance number
# (two allowed prefix letters, six digits, suffix A-D). Both start with two letters at a word
# start then (a space and) two digits: `_ID_HINT` finds those digits (a digit-led scan skips
# prose several times faster than a letter-led one), `_IDS` is then tried just before them.
_ID_HINT = re.compile(r"\d\d(?:(?<=(?<!\w)[A-Za-z]{2}\d\d)|(?<=(?<!\w)[A-Za-z]{2} \d\d))", re.ASCII)
_IDS = re.compile(
    r"(?<!\w)(?=[A-Za-z]{2} ?\d)(?:"
    r"(?P<iban>[A-Za-z]{2}\d{2}(?:[ ]?[A-Za-z0-9]{4}){2,7}(?:[ ]?[A-Za-z0-9]{1,4})?)\b"
    r"|(?P<nino>(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
    r" ?\d{2} ?\d{2} ?\d{2} ?[A-D])\b)",
    re.ASCII,
)
# Lengths from the SWIFT IBAN registry; other countries are left alone (fewer false positives).
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30,
    "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip

# IPv6 candidates: a run of hex digits and colons, maybe ending in an IPv4 address (validated by
# `ipaddress`), only from a run's start and with a colon within its first five characters.
_IPV6 = re.compile(
    r"(?<![\w:.])(?=[0-9A-Fa-f]{0,4}:)[0-9A-Fa-f:]{2,39}"
    r"(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?![\w:]|\.\d)"
)
# Exactly four numbers (each 0-255, checked in Python): "1.2.3", "v1.2.3.4" (a version) and
# "1.2.3.4.5" stay. Digit-led, with the boundary looked at behind the first digit.
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\w|\.\d)", re.ASCII)

# Where an SSN, card or phone number could be: 7+ digits, at most 3 separators between two
# (separators and digits never overlap, and nothing follows the repeat to fail). A span is
# found 256 digits at a time (so a scan can be sliced) and extended by `_NUMBER_MORE`.
_NUMBER_SPAN = re.compile(
    r"[+(\d](?:(?<=[+(])[+(]{0,3}\d|(?<=\d))(?:[ ().-]{0,3}\d){6,256}", re.ASCII
)
_NUMBER_MORE = re.compile(r"(?:[ ().-]{0,3}\d){1,256}", re.ASCII)
_NUMBER_SPAN_WHOLE = re.compile(_NUMBER_SPAN.pattern.replace("{6,256}", "{6,}"), re.ASCII)
_NUMBER_LONGEST = 5 + 4 * 256
# US SSN, dashes or spaces: area 000, 666 and 9xx, group 00 and serial 0000 never issued.
_SSN = re.compile(
    r"(?<![\w-])(?!000|666|9)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\w-])", re.ASCII
)
# How cards are written: 13-19 digits in one run, in fours (4-4-4-1..7) or Amex's 4-6-4/5, one
# kind of separator; not part of a longer digit run. Strict shapes: a candidate that fails Luhn
# is rare, so the scan can afford to go on from its next character (see `_sub_checked`).
_CARD = re.compile(
    r"(?<![\d.+])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{4,5})(?!\d)",
    re.ASCII,
)
_PHONE = re.compile(
    r"(?<!\w)(?:"  # every kind starts after a non-word character: one cheap test per position
    # international: +CC then separated groups (optional (0) or (area) group), or +digits
    r"(?<!\+)\+(?:\d{7,15}|\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]\d{1,10}){1,6})(?!\d)"
    # North American with separators: (555) 123-4567, 555-123-4567, 555.123.4567, 1-555-123-4567
    r"|(?:1[ .-])?(?:\(\d{3}\)[ ]?|\d{3}[.-])\d{3}[ .-]\d{4}\b"
    r"|\d{3} \d{3} \d{4}\b"
    # European national: 0 + area code, then groups of digits with spaces or dashes
    r"|0(?:0[1-9]|[1-9])\d{0,3}(?:[ -]\d{2,8}){1,4}\b"  # 0044 ...: international from Europe
    # French style 06 12 34 56 78 / 06.12.34.56.78 (one separator, repeated)
    r"|0[1-9](?P<sep>[ .])\d{2}(?:(?P=sep)\d{2}){3}\b"
    r")",
    re.ASCII,
)
_DATE = re.compile(r"\d{1,4}([-./])\d{1,2}\1\d{1,4}", re.ASCII)
_NON_DIGIT = re.compile(r"\D", re.ASCII)
_DIGIT = re.compile(r"[0-9]")
_NUMBER_CHARS = "0123456789 \t\r\n().+-"
_DELIMITERS = " \t\r\n,;\"'<>()[]{}|"
_TAIL = 4096  # a token longer than this at the cut only loses its last _TAIL characters
_NUMBER_TAIL = 64


# --------------------------------------------------------------------------- checks


def luhn_ok(digits: str) -> bool:
    """The card-number checksum: doubles every second digit from the right."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """Length for its country and the ISO 13616 mod-97 check (spaces ignored)."""
    compact = iban.replace(" ", "").upper()
    if _IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact.isalnum():
        return False
    if not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


# --------------------------------------------------------------------------- replacements


def _secret(match: re.Match[str]) -> str:
    text = match.group(0)
    if text.startswith("sk-") and _SK_BODY.search(text) is None:
        return text  # sk-some-hyphenated-words, not a key
    return SECRET


def _url_password(match: re.Match[str]) -> str:
    return f"://{match.group(1)}:{PASSWORD}@"


def _iban(text: str) -> str:
    length = _IBAN_LENGTHS.get(text[:2].upper())
    if length is None:
        return text
    # The pattern may run on into a following word: take exactly the country's length.
    seen = 0
    for index, char in enumerate(text):
        seen += char != " "
        if seen == length:
            cut = index + 1
            break
    else:
        return text
    rest = text[cut:]
    if rest and not rest.startswith(" "):
        return text  # the IBAN would end inside a longer token
    return IBAN + rest if iban_ok(text[:cut]) else text


# A check answers a candidate with its placeholder and how much of the match it replaces, or
# None to refuse it.
_Checked = tuple[str, int] | None


def _ipv6(match: re.Match[str]) -> _Checked:
    text = match.group(0)
    groups = [group for group in text.split(":") if group]
    # "x[1::2]" (a slice) or "10:30:00" (a time) are not addresses: two groups, one of 3+ digits.
    if len(groups) < 2 or max(map(len, groups)) < 3:
        return None
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return None
    return IP, len(text)


def _ipv4(match: re.Match[str]) -> _Checked:
    text = match.group(0)
    for part in text.split("."):
        if int(part) > 255 or (len(part) > 1 and part[0] == "0"):
            return None
    return IP, len(text)


def _card(match: re.Match[str]) -> _Checked:
    text = match.group(0)
    digits = _NON_DIGIT.sub("", text)
    if luhn_ok(digits) and digits.strip(digits[0]):  # not 0000 0000 ...
        return CARD, len(text)
    return None


def _phone(match: re.Match[str]) -> _Checked:
    """A phone number of 7-15 digits. Separated groups can run on into the next number
    ("+44 20 7946 0958 2024-01-15"): then the longest such prefix that ends a group is masked,
    and the scan goes on right after it."""
    text = match.group(0)
    counts = [0]
    for char in text:
        counts.append(counts[-1] + ("0" <= char <= "9"))
    for end in range(len(text), 0, -1):
        count = counts[end]
        if count < 7:
            break
        ends_group = "0" <= text[end - 1] <= "9" and (
            end == len(text) or not "0" <= text[end] <= "9"
        )
        if count <= 15 and ends_group and not _DATE.fullmatch(text[:end]):
            return PHONE, end
    return None


# --------------------------------------------------------------------------- passes


def _scan(pattern: re.Pattern[str], text: str, longest: int) -> Iterator[re.Match[str] | None]:
    """`pattern.finditer(text)`, with None every _SCAN characters (a caller may pause there).

    With `longest` (no match, lookarounds included, is longer), a long text is scanned in
    slices of _SCAN characters, so no single call into the regex engine runs for long: a match
    starting in a slice ends well before the slice's `endpos`, so it is found as in one scan.
    """
    size = len(text)
    if not longest:
        yield from pattern.finditer(text)
        return
    position = last = 0
    while position < size:
        stop = min(position + _SCAN, size)
        for match in pattern.finditer(text, position, min(stop + longest + 8, size)):
            if match.start() >= stop:
                break
            yield match
            last = match.end()
        position = max(stop, last)
        yield None


def _sub(pattern: re.Pattern[str], repl: _Repl, text: str, longest: int = 0) -> _Step:
    """`pattern.sub(repl, text)`, yielding every few matches and slices (see `_scan`)."""
    if len(text) <= _SHORT:
        return pattern.sub(repl, text)
    pieces: list[str] = []
    last = count = 0
    for match in _scan(pattern, text, longest):
        if match is None:
            yield
            continue
        start, end = match.span()
        pieces += [text[last:start], repl(match) if callable(repl) else repl]
        last = end
        count += 1
        if count % _SLICE_MATCHES == 0:
            yield
    pieces.append(text[last:])
    return "".join(pieces)


def _sub_checked(
    pattern: re.Pattern[str],
    check: Callable[[re.Match[str]], _Checked],
    text: str,
    longest: int,
) -> _Step:
    """`pattern.sub` for a bounded pattern (see `_scan`) whose `check` may refuse a match or
    replace only its beginning: the scan goes on from the next character not replaced, so a
    refused candidate (a date-like run, a number that fails Luhn) or one that ran on into the
    next number cannot hide a real one that overlaps it. Each position starts a match once."""
    size = len(text)
    pieces: list[str] = []
    last = position = count = 0
    while position < size:
        stop = min(position + _SCAN, size)
        match = pattern.search(text, position, min(stop + longest + 8, size))
        if match is None or match.start() >= stop:
            position = stop
            if size > _SHORT:
                yield
            continue
        start = match.start()
        checked = check(match)
        if checked is None:
            position = start + 1
        else:
            pieces += [text[last:start], checked[0]]
            last = position = start + checked[1]
        count += 1
        if count % _SLICE_MATCHES == 0 and size > _SHORT:
            yield
    if not pieces:
        return text
    pieces.append(text[last:])
    return "".join(pieces)


def _ids(text: str) -> _Step:
    """IBANs and National Insurance numbers, tried where `_ID_HINT` finds their first digits."""
    pieces: list[str] = []
    last = count = 0
    hints = _ID_HINT.finditer(text) if len(text) <= _SHORT else _scan(_ID_HINT, text, 8)
    for hint in hints:
        if hint is None:
            yield
            continue
        start = hint.start() - (3 if text[hint.start() - 1] == " " else 2)
        found = _IDS.match(text, start) if start >= last else None
        if found is None:
            continue
        masked = _iban(found.group(0)) if found.lastgroup == "iban" else NATIONAL_ID
        pieces += [text[last:start], masked]
        last = found.end()
        count += 1
        if count % _SLICE_MATCHES == 0:
            yield
    if not pieces:
        return text
    pieces.append(text[last:])
    return "".join(pieces)


def _private_keys(text: str) -> _Step:
    """Each BEGIN ... PRIVATE KEY block through its END; without an END, through the end of the
    text (a key cut short is still a key). Every character is searched at most twice."""
    pieces: list[str] = []
    position = 0
    ends_left = True  # once an END search fails, no later BEGIN has one either
    while True:
        begin = _PEM_BEGIN.search(text, position)
        if begin is None:
            break
        pieces += [text[position : begin.start()], PRIVATE_KEY]
        end = _PEM_END.search(text, begin.end()) if ends_left else None
        if end is None:
            ends_left = False
            position = len(text)
            break
        position = end.end()
        yield
    pieces.append(text[position:])
    return "".join(pieces)


def _number_span(text: str, low: int, high: int) -> _Step:
    span = text[low:high]
    # One character of context on each side keeps the lookbehinds and word boundaries honest.
    before, after = text[low - 1 : low] if low else "", text[high : high + 1]
    window = before + span + after
    window = yield from _sub(_SSN, SSN, window, 12)
    if not _DATE.fullmatch(span):  # 2024-01-15 10:30 is neither a card nor a phone
        window = yield from _sub_checked(_CARD, _card, window, 24)
        window = yield from _sub_checked(_PHONE, _phone, window, 80)
    return window[len(before) : len(window) - len(after)]


def _number_whole(match: re.Match[str]) -> str:
    return _drive(_number_span(match.string, *match.span()))


def _numbers(text: str) -> _Step:
    if len(text) <= _SHORT:  # one call, no pauses: the whole span in one match
        return _NUMBER_SPAN_WHOLE.sub(_number_whole, text)
    pieces: list[str] = []
    last = count = 0
    for match in _scan(_NUMBER_SPAN, text, _NUMBER_LONGEST):
        if match is None:
            yield
            continue
        start, end = match.span()
        if start < last:
            continue  # a piece of a span already taken whole
        while (more := _NUMBER_MORE.match(text, end)) is not None:
            end = more.end()
        pieces += [text[last:start], (yield from _number_span(text, start, end))]
        last = end
        count += 1
        if count % _SLICE_MATCHES == 0:
            yield
    pieces.append(text[last:])
    return "".join(pieces)


def _cut(text: str) -> str:
    """The first MAX_CHARS - room characters, without what straddles the cut: the token cut in
    two goes (back to a delimiter within the last _TAIL characters), and so do trailing digits
    and separators (a card or phone number written in groups)."""
    kept = text[: MAX_CHARS - _MARKER_ROOM]
    if not text[len(kept)].isspace():
        tail = kept[-_TAIL:]
        cut = max(tail.rfind(char) for char in _DELIMITERS)
        kept = kept[: len(kept) - len(tail) + cut + 1] if cut >= 0 else kept[: -len(tail)]
    return kept[:-_NUMBER_TAIL] + kept[-_NUMBER_TAIL:].rstrip(_NUMBER_CHARS)


def _mask(text: str) -> _Step:
    original = len(text)
    truncated = original > MAX_CHARS
    if truncated:
        text = _cut(text)
    long = len(text) > _SHORT  # a long text gives a pause after each pass
    if "-----BEGIN" in text:
        text = yield from _private_keys(text)
    for hint, pattern in _SECRETS:
        if hint in text:
            text = yield from _sub(pattern, _secret, text)
            if long:
                yield
    if "://" in text:
        text = yield from _sub(_URL_PASSWORD, _url_password, text, 400)
    if "@" in text:
        text = yield from _sub(_EMAIL, EMAIL, text)
        if long:
            yield
    if _DIGIT.search(text) is not None:
        text = yield from _ids(text)
        if ":" in text:
            text = yield from _sub_checked(_IPV6, _ipv6, text, 64)
        if "." in text:
            text = yield from _sub_checked(_IPV4, _ipv4, text, 16)
        text = yield from _numbers(text)
    if truncated or len(text) > MAX_CHARS:
        # Placeholders can be longer than what they replace: the masked text is cut again.
        text = text[: MAX_CHARS - _MARKER_ROOM] + _MARKER.format(n=original)
    return text


def _drive(step: _Step) -> str:
    while True:
        try:
            next(step)
        except StopIteration as done:
            result: str = done.value
            return result


def mask_pii(text: str) -> str:
    """Secrets, private keys, URL passwords, e-mails, IBANs, SSNs, UK NI numbers, IP addresses,
    Luhn-valid card numbers and phone numbers become placeholders; at most MAX_CHARS come back."""
    if not text:
        return text
    return _drive(_mask(text))


async def mask_pii_async(text: str, *, slice_s: float = 0.001) -> str:
    """`mask_pii` for the event loop: a text over ASYNC_THRESHOLD gives the loop back every
    `slice_s` of masking, so a 64 KB hostile prompt never holds other requests for long."""
    if len(text) <= ASYNC_THRESHOLD:
        return mask_pii(text)
    step = _mask(text)
    started = time.perf_counter()
    while True:
        try:
            next(step)
        except StopIteration as done:
            result: str = done.value
            return result
        if time.perf_counter() - started >= slice_s:
            await asyncio.sleep(0)
            started = time.perf_counter()
