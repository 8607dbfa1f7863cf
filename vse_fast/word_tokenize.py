"""NLTK-compatible word tokenizer for captions, without the nltk dependency.

The published VSE∞ BiGRU pipeline tokenizes with ``nltk.tokenize.word_tokenize(caption.lower())`` and
its requirements.txt pins ``nltk==3.5``. :func:`word_tokenize` reproduces that function as nltk 3.5
has it: ``sent_tokenize`` with the English punkt model, then ``NLTKWordTokenizer`` on each sentence.
Independent code; the rules are nltk 3.5's, applied in its order.

Sentence step (punkt). A candidate is the last ``.``/``?``/``!`` of a run of non-space characters that
is followed by whitespace and a token, or by one of ``?!)";}]*:@'({[``. It ends a sentence when
``?``/``!`` is involved or when the word ending in ``.`` is not an abbreviation (punkt's English list
below), an ellipsis, or an initial / number followed by ``;:,.!?`` or by a lower-case word (except
four that the model saw only sentence-initially). Quotes and brackets ``"')]}`` that follow a break
are moved back onto the sentence they close. This matters because the word step splits off only a
sentence-final period: nltk turns ``"a dog. a cat."`` into ``dog . a cat .``, ``"mr. smith"`` keeps
``mr.``. Known gap: the rest of the English model's orthographic statistics, its collocations and
sentence-starter list are not included; they only matter when the word after the period is
capitalised, so the result matches nltk on lower-cased captions such as the published pipeline's;
on mixed-case text a capital after an abbreviation/initial/number may break differently.

Word step (improved Treebank rules), in order:
  1. opening quotes: a double quote at the start or after a space/bracket becomes two backticks,
     curly/low/guillemet opening quotes and backtick runs are split off, a ``'`` before a
     one-character word other than m/t/s/d is split off it, also inside a word (``y'c`` -> ``y ' c``,
     ``rock'n'roll`` -> ``rock ' n'roll``); ``'em`` stays whole;
  2. punctuation: the sentence-final period, ``:``/``,`` not followed by a digit, ``...``, ``; @ #
     $ % &``, ``? !``, a ``'`` before a space, ``*``; then brackets ``()[]{}<>`` and ``--``;
  3. closing quotes: ``” ’ »`` are split off, other double quotes become ``''``, a ``''`` is split
     off the character before it; then the clitics ``'s 'm 'd 'll 're 've n't`` (and a bare ``'``)
     are split off the word before when an ASCII space follows (``it's`` before a tab or a
     non-breaking space stays whole);
  4. split words: cannot, d'ye, gimme, gonna, gotta, lemme, wanna, 'tis, 'twas (nltk's list also has
     mor'n, whose ``'n`` step 1 has already split off).

nltk 3.10 differs (measured on generated lower-cased strings): a leading ``'`` is split off any word
unless it begins a clitic (``'em`` -> ``' em``), never inside a word (``y'c``, ``rock'n'roll`` stay
whole); ``more'n`` -> ``more 'n``; U+2012..U+2015 dashes are split off; ``''`` is split off wherever
it is; whitespace becomes a space before the clitic rules (``it's\\xa0a`` -> ``it 's a``); in punkt,
curly quotes and guillemets end words and close sentences (``a dog.» a cat`` breaks), and the word
before a candidate is found by ASCII whitespace, several candidates in one run of non-space
characters judged apart; and the word rules run on the third-party ``regex`` engine (other
``\\w``/``\\s`` sets for combining marks, a few symbols, U+001C..U+001F).
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

# Lower-case words that punkt's training text showed only sentence-initially, never capitalised
# (the only orthographic data that matters on lower-cased text): after an initial or number they break.
_LOWER_STARTERS = frozenset(["administrators", "b-week", "r-revised", "z-holiday"])

_NON_WORD = "[?!)\";}\\]*:@'({\\[]"  # chars that end a punkt word
_MULTI = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"
# A possible break: the word up to its last end character, then (1) what follows, (2) the next token.
_PERIOD_CONTEXT = re.compile(rf"\S*[.?!](?=({_NON_WORD}|\s+(\S+)))")
_PUNKT_TOKEN = re.compile(
    rf"{_MULTI}"
    rf"|(?=[^(\"`{{\[:;&#*@)}}\]\-,])\S+?(?=\s|$|{_NON_WORD}|{_MULTI}|,(?=$|\s|{_NON_WORD}|{_MULTI}))"
    r"|\S"
)
_NUMBER = re.compile(r"-?[.,]?\d[\d,.-]*\.?")
_INITIAL = re.compile(r"[^\W\d]\.")
_CLOSERS = re.compile(r"[\"')\]}]+?(?:\s+|(?=--)|$)", re.MULTILINE)


def _breaks_after(token, following):
    """Punkt's verdict (first and second pass, see module doc) on ``token`` ending a sentence."""
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
        if following in (";", ":", ",", ".", "!", "?") or (is_initial and head.isupper()):
            return False
        if head.islower() and following.lower().removesuffix(".") not in _LOWER_STARTERS:
            return False
    return True


def _has_break(context):
    tokens = [tok for line in context.split("\n") if line.strip() for tok in _PUNKT_TOKEN.findall(line)]
    return any(_breaks_after(tok, nxt) for tok, nxt in zip(tokens, tokens[1:]))


def _sentence_slices(text):
    start = 0
    for match in _PERIOD_CONTEXT.finditer(text):
        if _has_break(match.group() + match.group(1)):
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
    (r"(?i)(')(?!re|ve|ll|m|t|s|d)(\w)\b", r"\1 \2"),
)
_PUNCTUATION = _rules(
    (r"([^.])(\.)([\])}>\"'»”’ ]*)\s*$", r"\1 \2 \3 "),  # sentence-final period
    (r"([:,])([^\d])", r" \1 \2"),
    (r"([:,])$", r" \1 "),
    (r"\.{2,}", r" \g<0> "),
    (r"[;@#$%&]", r" \g<0> "),
    (r"([^.])(\.)([\])}>\"']*)\s*$", r"\1 \2\3 "),
    (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "),
    (r"[*]", r" \g<0> "),
    (r"[\]\[(){}<>]", r" \g<0> "),
    (r"--", r" -- "),
)
_CLOSING_QUOTES = _rules(
    (r"([»”’])", r" \1 "),
    (r'"', " '' "),
    (r"(\S)('')", r"\1 \2 "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
)
# Words split in two (case-insensitive); "wanna" only before whitespace, 'tis/'twas after a space.
_SPLIT_WORDS = _rules(
    *[(rf"(?i)\b({a})({b})\b", r" \1 \2 ") for a, b in
      [("can", "not"), ("d", "'ye"), ("gim", "me"), ("gon", "na"), ("got", "ta"), ("lem", "me"), ("mor", "'n")]],
    (r"(?i)\b(wan)(na)\s", r" \1 \2 "),
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
