"""
Response-length dataset: prompts from shipped data, labels distilled from the target model.

TimeBill's predictor learns the lengths the *target* model really produces, so the labels come
from running that model (chat template, greedy, stop at EOS, up to a cap) on a mix of real
questions and length-steering instruction templates. The implementation lives in
:mod:`timebill_ros.core.rlp` (``prompts``, ``greedy_labeler``, ``labelling``, ``label_io``);
this module keeps the import path that the CLIs and tests use, re-exporting the public names.
"""

from __future__ import annotations

from .rlp.greedy_labeler import ContinuousGreedyLabeler, detect_loop
from .rlp.label_io import (
    CAPPED_NOTE,
    clamp_labels,
    DEFAULT_LABEL_FILE,
    extend_cap,
    load_labels,
    read_meta,
    REGENERATE_CMD,
    STRUCTURED_LABEL_FILE,
)
from .rlp.labelling import label_file, verify_loops
from .rlp.prompts import (
    build_prompts,
    chatterbot_questions,
    CODE_TASKS,
    fanoutqa_questions,
    LANGS,
    NUM_WORDS,
    prompt_id,
    PromptItem,
    ROBOT_TASKS,
    split_of,
    SPLITS,
    stable_hash,
    STORY_FORMS,
)

__all__ = [
    'CAPPED_NOTE',
    'CODE_TASKS',
    'DEFAULT_LABEL_FILE',
    'STRUCTURED_LABEL_FILE',
    'LANGS',
    'NUM_WORDS',
    'REGENERATE_CMD',
    'ROBOT_TASKS',
    'SPLITS',
    'STORY_FORMS',
    'ContinuousGreedyLabeler',
    'PromptItem',
    'build_prompts',
    'chatterbot_questions',
    'clamp_labels',
    'detect_loop',
    'extend_cap',
    'fanoutqa_questions',
    'label_file',
    'load_labels',
    'prompt_id',
    'read_meta',
    'split_of',
    'stable_hash',
    'verify_loops',
]
