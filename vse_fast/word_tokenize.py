"""NLTK-compatible word tokenizer for captions, without the nltk dependency.

The published VSE∞ BiGRU pipeline tokenizes with ``nltk.tokenize.word_tokenize(caption.lower())``.
:func:`word_tokenize` reproduces that function (behaviour reference: nltk 3.10, ``sent_tokenize``
with the English punkt model, then ``NLTKWordTokenizer`` on each sentence). Independent code;
the rules are nltk's, applied in nltk's order.

Sentence step (punkt). A candidate is a ``.``/``?``/``!`` followed by whitespace and a token, or by
closing/opening punctuation. It ends a sentence when ``?``/``!`` is involved or when the word
ending in ``.`` is not an abbreviation (punkt's English list below), an ellipsis, or an initial /
number followed by a lower-case word or by ``;:,.!?``. Quotes and brackets that follow a break
are moved back onto the sentence they close. This matters because the word step splits off only a
sentence-final period: nltk turns ``"a dog. a cat."`` into ``dog . a cat .``, ``"mr. smith"``
keeps ``mr.``. Known gap: the English model's orthographic statistics, collocations and
sentence-starter list are not included (nltk's model data is not available offline). They only
matter when the word after the period is capitalised (or, rarely, a lower-case word that punkt's
training text showed only sentence-initially in lower case and never capitalised), so the result
matches nltk on lower-cased captions such as the published pipeline's; on mixed-case text a
capital after an abbreviation/initial/number may break differently.

Word step (improved Treebank rules), in order:
  1. opening quotes: a double quote at the start or after a space/bracket becomes two backticks,
     curly/low/guillemet opening quotes and backtick runs are split off, a leading ``'`` is split
     off a word unless it begins a clitic;
  2. punctuation: the sentence-final period, ``:``/``,`` not followed by a digit, ``...``, ``; @ #
     $ % &``, figure/en/em dashes, ``? !``, a ``'`` before a space, ``*``; then brackets ``()[]{}<>``
     and ``--``;
  3. closing quotes: other double quotes become ``''``, ``” ’ »`` are split off, then the clitics
     ``'s 'm 'd 'll 're 've n't`` (and a bare ``'``) are split off the word before;
  4. split words: cannot, d'ye, gimme, gonna, gotta, lemme, more'n, wanna, 'tis, 'twas.

Differences from nltk that remain (exotic input only): nltk 3.10 runs the rules through the
third-party ``regex`` engine, this module through ``re``; they disagree on what ``\\w``/``\\s``
match for combining marks, connector punctuation other than ``_``, a few other symbols
(``²``, ``ⓐ``) and the control characters U+001C..U+001F. nltk 3.9 differs from 3.10 in two
rules (it splits a leading ``'`` only off a one-letter word and does not split off U+2012..U+2015
dashes); 3.10 is followed here.
"""

import re

__all__ = ["word_tokenize", "split_sentences", "tokenize_sentence"]

# ---------------------------------------------------------------- sentence step (punkt)

# Abbreviation types of nltk_data's English punkt model (tokenizers/punkt_tab/english/abbrev_types.txt).
_ABBREVIATIONS = frozenset(
    """
    a.a a.c a.d a.g a.h a.m a.m.e a.s a.t adm ala aug ariz ave b.f b.v bros c c.i.t c.o.m.b c.v
    calif chg cie co col colo conn corp cos ct d d.c d.h d.w dec dr e e.f e.h e.l e.m f f.g f.j
    feb fla fri ft g g.d g.f g.k ga gen h h.c h.f h.m i.m.s ill inc j.b j.c j.j j.k j.p j.r jan jr
    k kan ky l l.a l.f l.p lt ltd m m.b.a m.d.c m.j maj messrs mg mich minn mr mrs ms n n.c n.d
    n.h n.j n.m n.v n.y nev nov ok okla oct ore p p.a.m p.m pa ph.d prof r r.a r.h r.i r.j r.k
    r.t rep reps s s.a s.a.y s.c s.g s.p.a s.s sen sep sept sr st sw t t.j tenn tues u.k u.n
    u.s u.s.a u.s.s.r v va vs vt w w.c w.r w.va w.w wash wed wis yr
    """.split()
)

_ASCII_SPACE = " \t\n\r\x0b\x0c"  # punkt looks for the start of the word before a break with these
_NON_WORD = "[)\";}\\]*:@'({\\[\u2018\u2019\u201c\u201d\xab\xbb?!]"  # chars that end a punkt word
_MULTI = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"
# A possible break: the end character, then (1) what follows it, (2) the next token if it is a word.
_CANDIDATE = re.compile(rf"[.?!](?=({_NON_WORD}|\s+(\S+)))")
_PUNKT_TOKEN = re.compile(
    rf"{_MULTI}"
    rf"|(?=[^(\"`{{\[:;&#*@)}}\]\-,])\S+?(?=\s|$|{_NON_WORD}|{_MULTI}|,(?=$|\s|{_NON_WORD}|{_MULTI}))"
    r"|\S"
)
_NUMBER = re.compile(r"-?[.,]?\d[\d,.-]*\.?")
_INITIAL = re.compile(r"[^\W\d]\.")
_CLOSERS = re.compile(r"[\"')\]}\u2018\u2019\u201c\u201d\xab\xbb]+?(?:\s+|(?=--)|$)", re.MULTILINE)


def _breaks_after(token, following):
    """Punkt's verdict (first and second pass, no orthographic data) on ``token`` ending a sentence."""
    if token in ("?", "!"):
        return True
    if not token.endswith(".") or token.endswith(".."):
        return False
    stem = token[:-1].lower()
    if stem in _ABBREVIATIONS or stem.split("-")[-1] in _ABBREVIATIONS:
        return False
    is_initial = _INITIAL.fullmatch(token) is not None
    if is_initial or _NUMBER.fullmatch(token.lower()):
        head = following[0]
        if following in (";", ":", ",", ".", "!", "?") or head.islower() or (is_initial and head.isupper()):
            return False
    return True


def _has_break(context):
    tokens = [tok for line in context.split("\n") if line.strip() for tok in _PUNKT_TOKEN.findall(line)]
    return any(_breaks_after(tok, nxt) for tok, nxt in zip(tokens, tokens[1:]))


def _sentence_slices(text):
    # Of a run of candidates inside one word only the last is judged. As in punkt, the word starts
    # after the last space since the previous candidate, else where the previous candidate's did.
    kept, previous, previous_end, previous_word = [], None, 0, 0
    for match in _CANDIDATE.finditer(text):
        space = max(text.rfind(ch, previous_end, match.start()) for ch in _ASCII_SPACE)
        word_start = space + 1 if space > previous_end else previous_word
        if previous is not None and previous_end <= word_start:
            kept.append((previous, previous_word))
        previous, previous_end, previous_word = match, match.start(), word_start
    if previous is not None:
        kept.append((previous, previous_word))
    start = 0
    for match, word_start in kept:
        if _has_break(text[word_start : match.end()] + match.group(1)):
            yield start, match.end()
            start = match.start(2) if match.group(2) else match.end()
    yield start, len(text.rstrip())


def split_sentences(text):
    """Sentences of ``text`` as nltk's English punkt ``sent_tokenize`` gives them (see module doc)."""
    slices = list(_sentence_slices(text))
    sentences, shift = [], 0
    for i, (start, stop) in enumerate(slices):
        start += shift
        shift = 0
        closers = _CLOSERS.match(text, *slices[i + 1]) if i + 1 < len(slices) else None
        if closers:  # quotes/brackets right after the break close this sentence
            sentences.append(text[start : slices[i + 1][0] + len(closers.group().rstrip())])
            shift = closers.end() - slices[i + 1][0]
        elif stop > start:
            sentences.append(text[start:stop])
    return sentences


# ---------------------------------------------------------------- word step (Treebank rules)


def _rules(*pairs):
    return [(re.compile(pattern), replacement) for pattern, replacement in pairs]


_OPENING_QUOTES = _rules(
    (r"([«“‘„]|`+)", r" \1 "),
    (r'^"', "``"),
    (r"(``)", r" \1 "),
    (r"([ (\[{<])(\"|'')", r"\1 `` "),
    (r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", r"\1 "),
)
_PUNCTUATION = _rules(
    (r"([^.])(\.)([\])}>\"'»”’ ]*+)\s*$", r"\1 \2 \3 "),  # sentence-final period
    (r"([:,])([^\d])", r" \1 \2"),
    (r"([:,])$", r" \1 "),
    (r"\.{2,}", r" \g<0> "),
    (r"[;@#$%&]", r" \g<0> "),
    (r"[\u2012-\u2015]", r" \g<0> "),
    (r"([^.])(\.)([\])}>\"']*)\s*$", r"\1 \2\3 "),
    (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "),
    (r"[*]", r" \g<0> "),
    (r"[\]\[(){}<>]", r" \g<0> "),
    (r"--", r" -- "),
)
_CLOSING_QUOTES = _rules(
    (r"([»”’])", r" \1 "),
    (r"''", " '' "),
    (r'"', " '' "),
    (r"\s+", " "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
)
# Words split in two (case-insensitive); "wanna" only before whitespace, 'tis/'twas after a space.
_SPLIT_WORDS = _rules(
    *[(rf"(?i)\b({a})({b})\b", r" \1 \2 ") for a, b in
      [("can", "not"), ("d", "'ye"), ("gim", "me"), ("gon", "na"), ("got", "ta"), ("lem", "me"), ("more", "'n")]],
    (r"(?i)\b(wan)(na)(?=\s)", r" \1 \2 "),
    (r"(?i) ('t)(is)\b", r" \1 \2 "),
    (r"(?i) ('t)(was)\b", r" \1 \2 "),
)


def _apply(rules, text):
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def tokenize_sentence(sentence):
    """``NLTKWordTokenizer().tokenize(sentence)``: one sentence, no sentence splitting."""
    text = _apply(_PUNCTUATION, _apply(_OPENING_QUOTES, sentence))
    return _apply(_SPLIT_WORDS, _apply(_CLOSING_QUOTES, f" {text} ")).split()


def word_tokenize(text: str) -> list[str]:
    """``nltk.tokenize.word_tokenize(text)`` (English): punkt sentences, then Treebank word rules.

    The published pipeline calls it on ``caption.lower()``; pass lower-cased text to match it
    exactly (see the module doc for what differs on capitalised text).
    """
    if not isinstance(text, str):
        raise TypeError(f"word_tokenize expects a str, got {type(text).__name__}")
    return [token for sentence in split_sentences(text) for token in tokenize_sentence(sentence)]
