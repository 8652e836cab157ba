"""VQA answer processing and accuracy, as the official VQA evaluation (GT-Vision-Lab/VQA, vqaEval.py,
v2 release) computes them, so that our accuracy on a split equals the evaluation server's.

Per question, with the 10 annotators' answers and one predicted answer:
1. every answer has newlines and tabs turned into spaces and is stripped;
2. only if the annotators did not all give the same (stripped) string, every answer (the annotators'
   and the prediction) is normalised (`normalize_answer`): punctuation, then lower case, number words
   to digits ("none" too), articles dropped, missing contraction apostrophes added. A unanimous
   answer is compared as it is, so a prediction must then match it exactly;
3. for each annotator, the prediction scores min(1, (matching answers among the other 9) / 3); the
   question's accuracy is the mean of these 10 scores.
The split's accuracy (overall and per answer type) is the mean over its questions; the server reports
100 x that, rounded to 2 decimals.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

# Punctuation replaced by a space, or removed where it touches a space or the answer holds a digit
# group comma ("100,978"). Apostrophes and colons are kept ("girl's", "2:50").
_PUNCTUATION = ';/[]"{}()=+\\_->' + "<@`,?!"
_DIGIT_COMMA = re.compile(r"\d,\d")
# A period is removed unless a digit follows it (decimals); the official call passes re.UNICODE (32) as
# the count argument, so at most the first 32 periods go.
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32
_NUMBER_WORDS = {w: str(i)
                 for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions the evaluation restores when written without (one of) their apostrophes: "dont" ->
# "don't", "couldnt've" and "couldn'tve" -> "couldn't've" (never both apostrophes missing).
_CONTRACTED = """
    ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
    he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am might've mightn't mightn't've
    must've mustn't needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't
    shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
    something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
    they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's
    where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
    wouldn't wouldn't've y'all y'all'd've y'all'll you'd you'd've you'll you're you've
""".split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in _CONTRACTED:
        cuts = [i for i, ch in enumerate(word) if ch == "'"]
        for i in cuts:  # one apostrophe missing (the only one, or one of several)
            table[word[:i] + word[i + 1:]] = word
    table["somebody'd"] = "somebodyd"  # the official table maps this one the other way round
    return table


CONTRACTIONS = _contraction_table()


def clean(answer: str) -> str:
    """Newlines and tabs to spaces, outer spaces stripped (applied to every answer first)."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str) -> str:
    remove = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if p in text:
            out = out.replace(p, "" if remove or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def _digits_articles_contractions(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official answer normalisation: "Two." -> "2", "a Red car!" -> "red car", "dont" -> "don't"."""
    return _digits_articles_contractions(_punctuation(clean(answer)))


def answer_accuracy(prediction: str, annotator_answers: Sequence[str]) -> float:
    """The official VQA accuracy of one predicted answer (see the module docstring), in [0, 1]."""
    answers = [clean(a) for a in annotator_answers]
    if not answers:
        raise ValueError("a question without annotator answers has no accuracy")
    prediction = clean(prediction)
    if len(set(answers)) > 1:
        answers = [normalize_answer(a) for a in answers]
        prediction = normalize_answer(prediction)
    matches = sum(a == prediction for a in answers)
    return _leave_one_out(matches, len(answers))


def soft_scores(annotator_answers: Sequence[str]) -> dict[str, float]:
    """Training targets: the accuracy each distinct normalised answer would get, by the same
    leave-one-out rule. Unlike step 2 above, unanimous answers are normalised too, so that "Two" x 10
    teaches "2", the form in the answer vocabulary."""
    counts = Counter(normalize_answer(a) for a in annotator_answers)
    total = sum(counts.values())
    return {a: _leave_one_out(c, total) for a, c in counts.items()}


def _leave_one_out(matches: int, total: int) -> float:
    """Mean over the `total` annotators left out in turn of min(1, matches among the rest / 3): leaving
    out one of the `matches` who gave the answer leaves matches - 1, leaving out another leaves matches."""
    return (matches * min(1.0, (matches - 1) / 3) + (total - matches) * min(1.0, matches / 3)) / total
