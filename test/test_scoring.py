"""Scoring functions against values computed by hand (shown next to each case)."""

import pytest
from timebill_ros.core.evaluation import scoring as s


def test_normalize_drops_case_punctuation_articles():
    assert s.normalize_answer('  The Pass-Key is: 71432!  ') == 'pass key is 71432'
    assert s.normalize_answer('An apple, a day') == 'apple day'
    assert s.normalize_answer('theory') == 'theory'  # 'the' only as a whole word


def test_exact_match():
    assert s.exact_match('James Watt.', 'james watt') == 1.0
    assert s.exact_match('James Watt invented it', 'james watt') == 0.0
    assert s.exact_match('left', ['Right', 'Left']) == 1.0  # best of several references


def test_contains_whole_tokens():
    assert s.contains('The pass key is 71432.', '71432') == 1.0
    assert s.contains('The pass key is 714321.', '71432') == 0.0
    assert s.contains('It was thomas edison, I think', 'Thomas Edison') == 1.0
    assert s.contains('edison thomas', 'Thomas Edison') == 0.0  # order matters


def test_token_f1_hand_computed():
    # pred tokens [cat, sat, on, mat], ref [cat, on, mat]: common 3, P = 3/4, R = 1
    assert s.token_f1('the cat sat on the mat', 'a cat on a mat') == pytest.approx(2 * 0.75 / 1.75)
    # duplicates count once per occurrence: pred [left, left, right], ref [left, right, right]
    # common = min(2,1) + min(1,2) = 2, P = R = 2/3 -> F1 = 2/3
    assert s.token_f1('left left right', 'left right right') == pytest.approx(2 / 3)
    assert s.token_f1('blue', 'green') == 0.0
    assert s.token_f1('', '') == 1.0 and s.token_f1('', 'x') == 0.0
    # best reference wins: vs "paris" F1 = 2*(1/3)*1/(4/3) = 0.5
    assert s.token_f1('it is paris', ['london', 'Paris']) == pytest.approx(0.5)


def test_lcs_length():
    assert s.lcs_length('ABCBDAB', 'BDCABA') == 4  # CLRS example: "BCBA"
    assert s.lcs_length([], ['a']) == 0


def test_rouge_l_hand_computed():
    # Lin (2004): ref "police killed the gunman", cand "police kill the gunman"
    # normalised: [police, killed, gunman] vs [police, kill, gunman] -> LCS 2, P = R = 2/3
    assert s.rouge_l('police kill the gunman', 'police killed the gunman') == pytest.approx(2 / 3)
    # cand "the gunman kill police": LCS([gunman, kill,
    # police], [police, killed, gunman]) = 1 -> 1/3
    assert s.rouge_l('the gunman kill police', 'police killed the gunman') == pytest.approx(1 / 3)
    # P = 3/5 (pred has 5 tokens), R = 3/3 -> F = 2*0.6*1/1.6 = 0.75
    assert s.rouge_l('pat burrell right mark left', 'burrell right left') == pytest.approx(0.75)
    # β = 2 weighs recall: (1+4)·0.6·1/(1 + 4·0.6) = 3/3.4
    assert s.rouge_l('pat burrell right mark left', 'burrell right left', beta=2) == pytest.approx(
        3 / 3.4
    )
    assert s.rouge_l('nothing shared', 'x y') == 0.0


def test_score_dispatch_and_errors():
    assert s.score('token_f1', 'a b', 'a b') == 1.0
    with pytest.raises(ValueError, match='unknown metric'):
        s.score('bleu', 'a', 'a')
    with pytest.raises(ValueError, match='reference'):
        s.exact_match('a', [])
