"""vse_fast.word_tokenize against nltk's word_tokenize (the published BiGRU caption tokenizer)."""

import random

import pytest

from vse_fast.word_tokenize import split_sentences, tokenize_sentence, word_tokenize

# Expected outputs produced by nltk 3.5 (the published requirements.txt pin): NLTKWordTokenizer on the punkt
# sentences (PunktSentenceTokenizer with the English model's parameters), i.e. nltk.word_tokenize on lower-cased
# text. The rows with ids are where nltk 3.10 differs.
WORD_TOKENIZE_CASES = [
    ("a man's dog isn't here", ['a', 'man', "'s", 'dog', 'is', "n't", 'here']),
    ("they're here and we've got it", ['they', "'re", 'here', 'and', 'we', "'ve", 'got', 'it']),
    ("you'll see he'd go i'm sure", ['you', "'ll", 'see', 'he', "'d", 'go', 'i', "'m", 'sure']),
    ("don't stop", ['do', "n't", 'stop']),
    ("the dogs' bowls", ['the', 'dogs', "'", 'bowls']),
    ('i cannot go', ['i', 'can', 'not', 'go']),
    ('gonna gotta gimme lemme', ['gon', 'na', 'got', 'ta', 'gim', 'me', 'lem', 'me']),
    ('wanna go', ['wan', 'na', 'go']),
    pytest.param('wanna-be star', ['wanna-be', 'star'], id="wanna-split-only-before-whitespace"),
    pytest.param("more'n d'ye", ['more', "'", 'n', 'd', "'ye"], id="more'n-not-a-contraction"),
    pytest.param("'tis the season 'twas", ["'t", 'is', 'the', 'season', "'t", 'was'], id="'tis-'twas-split"),
    ('"hello" he said', ['``', 'hello', "''", 'he', 'said']),
    ('a sign that says "stop"', ['a', 'sign', 'that', 'says', '``', 'stop', "''"]),
    pytest.param("the 'word' here", ['the', "'word", "'", 'here'], id="leading-apostrophe-kept-on-word"),
    pytest.param("'hi there", ["'hi", 'there'], id="leading-apostrophe-kept-at-start"),
    pytest.param("'em all", ["'em", 'all'], id="leading-apostrophe-kept-on-'em"),
    pytest.param("y'c and 'a dog", ['y', "'", 'c', 'and', "'", 'a', 'dog'],
                 id="apostrophe-split-off-one-letter-word"),
    pytest.param("rock'n'roll", ['rock', "'", "n'roll"], id="rock'n'roll-first-'n-split"),
    pytest.param("''hi'' a''b", ["''hi", "''", 'a', "''", 'b'], id="two-apostrophes-kept-after-space"),
    pytest.param("it's\xa0a dog", ["it's", 'a', 'dog'], id="no-break-space-after-clitic-keeps-it"),
    pytest.param("it's\there", ["it's", 'here'], id="tab-after-clitic-keeps-it"),
    ('“curly” ‘quotes’ «guillemets»', ['“', 'curly', '”', '‘', 'quotes', '’', '«', 'guillemets', '»']),
    ("a ''quoted'' word ``tex``", ['a', '``', 'quoted', "''", 'word', '``', 'tex', '``']),
    ('3.5 meters and 1,000 people at 10:30', ['3.5', 'meters', 'and', '1,000', 'people', 'at', '10:30']),
    ('$5 and 50% & more', ['$', '5', 'and', '50', '%', '&', 'more']),
    ('visit http://www.example.com/a?b=c now', ['visit', 'http', ':', '//www.example.com/a', '?', 'b=c', 'now']),
    ('a@b #tag a*b', ['a', '@', 'b', '#', 'tag', 'a', '*', 'b']),
    pytest.param('salt&pepper', ['salt', '&', 'pepper'], id="ampersand-inside-a-word-split-off"),
    ('a well-known dog -- or not', ['a', 'well-known', 'dog', '--', 'or', 'not']),
    ('wait... what', ['wait', '...', 'what']),
    ('a (big) dog [small] {red} <box>',
     ['a', '(', 'big', ')', 'dog', '[', 'small', ']', '{', 'red', '}', '<', 'box', '>']),
    ('a dog, a cat; a bird: yes', ['a', 'dog', ',', 'a', 'cat', ';', 'a', 'bird', ':', 'yes']),
    ('end with comma,', ['end', 'with', 'comma', ',']),
    pytest.param('a–b — c', ['a–b', '—', 'c'], id="en-em-dash-not-split-off"),
    pytest.param('a‒b a―b', ['a‒b', 'a―b'], id="figure-dash-horizontal-bar-not-split-off"),
    ('is it a dog? yes!', ['is', 'it', 'a', 'dog', '?', 'yes', '!']),
    ('a dog.', ['a', 'dog', '.']),
    ('a dog. a cat.', ['a', 'dog', '.', 'a', 'cat', '.']),
    ('a dog .', ['a', 'dog', '.']),
    ('a dog.a cat', ['a', 'dog.a', 'cat']),
    ('mr. smith walks.', ['mr.', 'smith', 'walks', '.']),
    pytest.param('the x-mr. smith walks', ['the', 'x-mr.', 'smith', 'walks'],
                 id="punkt-hyphenated-abbreviation-no-break"),
    ('the u.s. flag.', ['the', 'u.s.', 'flag', '.']),
    ('a car wash. a dog.', ['a', 'car', 'wash.', 'a', 'dog', '.']),
    ('number 5. a dog', ['number', '5.', 'a', 'dog']),
    ('the letter b. the end', ['the', 'letter', 'b.', 'the', 'end']),
    pytest.param('number 3. ? yes', ['number', '3.', '?', 'yes'], id="punkt-number-before-question-mark-no-break"),
    pytest.param('number 3. . ok', ['number', '3.', '.', 'ok'], id="punkt-number-before-period-no-break"),
    pytest.param('the letter b. ! ok', ['the', 'letter', 'b.', '!', 'ok'], id="punkt-initial-before-bang-no-break"),
    pytest.param('the letter b. \u210d end', ['the', 'letter', 'b.', '\u210d', 'end'],
                 id="punkt-initial-before-uncased-capital-no-break"),
    ('(a dog.) a cat.', ['(', 'a', 'dog', '.', ')', 'a', 'cat', '.']),
    ('"a dog." a cat.', ['``', 'a', 'dog', '.', "''", 'a', 'cat', '.']),
    ('a dog.. a cat', ['a', 'dog', '..', 'a', 'cat']),
    pytest.param('a dog. “a cat.” x', ['a', 'dog', '.', '“', 'a', 'cat.', '”', 'x'],
                 id="punkt-curly-quote-not-realigned"),
    pytest.param('a dog.» a cat', ['a', 'dog.', '»', 'a', 'cat'], id="punkt-guillemet-after-period-no-break"),
    pytest.param('number 5. administrators', ['number', '5', '.', 'administrators'],
                 id="punkt-number-before-lower-case-sentence-starter"),
    pytest.param('number 5. b-week', ['number', '5', '.', 'b-week'], id="punkt-number-before-sentence-starter-b-week"),
    pytest.param('number 5. r-revised', ['number', '5', '.', 'r-revised'],
                 id="punkt-number-before-sentence-starter-r-revised"),
    pytest.param('the letter b. z-holiday', ['the', 'letter', 'b', '.', 'z-holiday'],
                 id="punkt-initial-before-sentence-starter-z-holiday"),
    ('two  spaces\tand\ttabs\nnewline', ['two', 'spaces', 'and', 'tabs', 'newline']),
    ('a\xa0café', ['a', 'café']),
    ('a 🐶 dog', ['a', '🐶', 'dog']),
    ('', []),
    ('   ', []),
    ('.', ['.']),
]

# Expected outputs produced by nltk 3.5 NLTKWordTokenizer alone (word_tokenize(s, preserve_line=True)),
# where that differs from the sentence-split result above: only a sentence-final period is split off.
PRESERVE_LINE_CASES = [
    ('a dog. a cat.', ['a', 'dog.', 'a', 'cat', '.']),
    ('(a dog.) a cat.', ['(', 'a', 'dog.', ')', 'a', 'cat', '.']),
    ('"a dog." a cat.', ['``', 'a', 'dog.', "''", 'a', 'cat', '.']),
]

# Expected outputs produced by nltk 3.5 PunktSentenceTokenizer with the English model's parameters.
SENTENCE_CASES = [
    ('a dog. a cat.', ['a dog.', 'a cat.']),
    ('mr. smith walks. a dog.', ['mr. smith walks.', 'a dog.']),
    ('(a dog.) a cat.', ['(a dog.)', 'a cat.']),
    ('number 5. a dog', ['number 5. a dog']),
    ('is it? yes.', ['is it?', 'yes.']),
    pytest.param('a dog. “a cat.” x', ['a dog.', '“a cat.” x'], id="curly-quote-not-realigned"),
    pytest.param('a dog.» a cat', ['a dog.» a cat'], id="guillemet-after-period-no-break"),
    pytest.param('number 5. administrators', ['number 5.', 'administrators'],
                 id="number-before-lower-case-sentence-starter"),
    pytest.param('number 3. ? yes', ['number 3. ?', 'yes'], id="number-before-question-mark-no-break"),
    pytest.param('wait... what', ['wait... what'], id="ellipsis-no-break"),
    pytest.param('a dog.. a cat', ['a dog.. a cat'], id="double-period-no-break"),
    pytest.param('a dog.)-- a cat', ['a dog.)', '-- a cat'], id="closer-before-dashes-realigned"),
    pytest.param('(a dog.)-- a cat', ['(a dog.)', '-- a cat'], id="bracketed-closer-before-dashes-realigned"),
]


@pytest.mark.parametrize(("text", "expected"), WORD_TOKENIZE_CASES)
def test_word_tokenize_table(text, expected):
    assert word_tokenize(text) == expected


@pytest.mark.parametrize(("text", "expected"), PRESERVE_LINE_CASES)
def test_tokenize_sentence_table(text, expected):
    assert tokenize_sentence(text) == expected


@pytest.mark.parametrize(("text", "expected"), SENTENCE_CASES)
def test_split_sentences_table(text, expected):
    assert split_sentences(text) == expected


def test_word_tokenize_rejects_non_str():
    with pytest.raises(TypeError, match="expects a str, got bytes"):
        word_tokenize(b"a dog")


_WORDS = (
    "a man dog the on cat is riding with st mr dr wash ill ok co u.s e.g i.e a.m x b 3 2015 3.5 1,000 10:30 café "
    "can gon wan man's they're it's isn't can't won't i'm we'll you've he'd cannot gonna wanna gotta gimme lemme "
    "'tis 'em y'c more'n d'ye rock'n'roll administrators well-known http://x.com/a.b a.b.c no ave inc vs p s"
).split()
_PUNCT = ". , ! ? ; : ' \" ( ) [ ] { } < > - -- ... .. & $ % # @ * ` `` '' 's n't “ ” ‘ ’ « » – — / + =".split()
_SEPARATORS = [" ", " ", " ", "", "  ", "\t", "\n", "\xa0"]
_CHARS = "ab st.mr.,;:!?'\"()[]{}<>-&$%#@*`“”‘’«»–—…0123456789 \t\n\xa0é_"


def _generated_strings(count, seed):
    """Lower-cased caption-like strings (words, clitics, punctuation) and raw character soup."""
    rng = random.Random(seed)
    for i in range(count):
        if i % 2:
            yield "".join(rng.choice(_CHARS) for _ in range(rng.randint(0, 25)))
        else:
            parts = [rng.choice(_WORDS if rng.random() < 0.6 else _PUNCT) + rng.choice(_SEPARATORS)
                     for _ in range(rng.randint(0, 14))]
            yield "".join(parts)


def test_matches_nltk_on_generated_strings():
    nltk = pytest.importorskip("nltk")
    if nltk.__version__.split(".")[:2] != ["3", "5"]:
        pytest.skip(f"the reference is nltk 3.5 (the published pin), nltk {nltk.__version__} is installed")
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    from vse_fast.word_tokenize import _ABBREVIATIONS, _LOWER_STARTERS

    # English punkt as nltk 3.5 builds it, given the model's parameters that matter on lower-cased text:
    # the abbreviations and the lower-case words seen only sentence-initially (ortho context "begins lower").
    params = PunktParameters()
    params.abbrev_types = set(_ABBREVIATIONS)
    params.ortho_context.update(dict.fromkeys(_LOWER_STARTERS, 1 << 4))
    punkt = PunktSentenceTokenizer(params)
    treebank = NLTKWordTokenizer()
    for text in _generated_strings(1500, seed=0):
        assert tokenize_sentence(text) == treebank.tokenize(text), repr(text)
        sentences = punkt.tokenize(text)
        assert split_sentences(text) == sentences, repr(text)
        assert word_tokenize(text) == [tok for s in sentences for tok in treebank.tokenize(s)], repr(text)
