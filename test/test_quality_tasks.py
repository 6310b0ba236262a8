"""Long-context quality tasks: deterministic, within length, facts planted, exact-match scoring."""

import re

from timebill_ros.core.evaluation import longctx_tasks as lt
from timebill_ros.core.evaluation.tasks import word_counter


def test_candidates_are_deterministic_balanced_and_fit_their_length():
    a = lt.build_candidates(word_counter, 10, lengths=(300, 600), seed=1)
    b = lt.build_candidates(word_counter, 12, lengths=(300, 600), seed=1)
    assert [t.to_dict() for t in a] == [t.to_dict() for t in b[:10]]
    assert {t.kind for t in a} == set(lt.KINDS)
    for t in a:
        target = t.meta['target_tokens']
        assert target * 0.6 < t.n_tokens <= target  # whole paragraphs: a coarse fit at 300
        assert t.prompt.rstrip().split('\n')[-1].endswith('only.')  # the question is the last line
        assert t.metric == 'exact_match' and len(t.references) == 1
    other = lt.build_candidates(word_counter, 10, lengths=(300, 600), seed=2)
    assert [t.prompt for t in other] != [t.prompt for t in a]


def test_the_planted_facts_answer_the_question():
    for t in lt.build_candidates(word_counter, 10, lengths=(400,), seed=0):
        ref = t.references[0]
        body = t.prompt
        if t.kind == 'passkey':
            assert f'The pass key is {ref}.' in body
        elif t.kind == 'kv':
            locker = body.rsplit('code of the ', 1)[1].split(' locker')[0]
            assert f'The code of the {locker} locker is {ref}.' in body
            assert body.count(' locker is ') == 4
        elif t.kind == 'twohop':
            name = body.split('The secret agent is called ', 1)[1].split('.')[0]
            assert f'{name} lives in {ref}.' in body
            assert body.count(' lives in ') == 3
        else:
            assert body.count(ref) == 2
        # no answer word occurs in the distractor text by chance
        present = [
            w for w in lt.answer_vocabulary(t.kind) if re.search(rf'\b{w}\b', body, re.I)
        ]
        assert len(present) == {'city': 1, 'colour': 1, 'twohop': 3}.get(t.kind, 0)


def test_exact_match_on_the_extracted_answer():
    assert lt.exact_match('passkey', '48213', '48213')
    assert lt.exact_match('passkey', 'The pass key is 48213.', '48213')
    assert not lt.exact_match('passkey', '482131', '48213')
    assert not lt.exact_match('passkey', '4821', '48213')
    assert not lt.exact_match('passkey', 'I do not know.', '48213')
    assert lt.exact_match('city', 'The secret city is Lisbon.', 'Lisbon')
    assert lt.exact_match('colour', 'Teal', 'teal')
    assert not lt.exact_match('city', 'Oslo or Lisbon', 'Lisbon')  # the first city counts
    assert lt.extract_answer('colour', 'blue') is None


def test_answer_decided_only_when_more_text_cannot_change_it():
    assert not lt.answer_decided('passkey', 'The pass key is 482')
    assert lt.answer_decided('passkey', 'The pass key is 48213.')
    assert not lt.answer_decided('city', 'Lis')
    assert not lt.answer_decided('city', 'Lisbon')
    assert lt.answer_decided('city', 'Lisbon.')


def test_cache_round_trip(tmp_path):
    path = str(tmp_path / 'c.jsonl')
    tasks, p = lt.load_or_build(word_counter, 3, path, lengths=(300,))
    again, _ = lt.load_or_build(word_counter, 2, p)
    assert [t.to_dict() for t in again] == [t.to_dict() for t in tasks[:2]]
    assert lt.summary(tasks)['n'] == 3
