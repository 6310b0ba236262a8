#!/usr/bin/env python3
"""
Which grammar library masks a token fastest on this CPU: llguidance vs xgrammar.

Structured output applies a token mask at every decode step, on the critical path of a
deadline. Both libraries compile a JSON schema against the target's tokenizer and then, per
step, fill a vocabulary bitmask, which is applied to the logits, and accept the chosen token.
This times exactly that loop (fill + apply + accept) while forcing the tokens of a valid
answer, for the schemas the robot workloads use; the one-off compile time and the first mask
(llguidance builds its token trie lazily on the first mask of a tokenizer: seconds, once per
process, so the engine warms it at load) are reported apart.

With ``--engine`` it also times the served decode (the C++ step) on the default model with and
without a schema: ms per token, and the mask's share.

    python benchmarks/bench_grammar.py [--engine] [--out results/grammar]

Last line: ``llguidance_ms=… xgrammar_ms=… fastest=…`` (mean mask ms per token; xgrammar only
where installed: it is not a dependency).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import statistics
import sys
import time

import torch

SCHEMAS = {
    'colours': (
        {'type': 'array', 'items': {'type': 'string'}, 'minItems': 1, 'maxItems': 8},
        ['red', 'amber', 'green'],
    ),
    'objects': (
        {
            'type': 'object',
            'properties': {
                'objects': {
                    'type': 'array',
                    'items': {'type': 'string', 'pattern': '^[a-z]+_[0-9]+$'},
                }
            },
            'required': ['objects'],
            'additionalProperties': False,
        },
        {'objects': [f'cup_{i}' for i in range(12)] + [f'box_{i}' for i in range(9)]},
    ),
    'plan': (
        {
            'type': 'object',
            'properties': {
                'steps': {
                    'type': 'array',
                    'items': {
                        'type': 'object',
                        'properties': {
                            'action': {'enum': ['goto', 'pick', 'place', 'inspect']},
                            'target': {'type': 'string'},
                        },
                        'required': ['action', 'target'],
                        'additionalProperties': False,
                    },
                }
            },
            'required': ['steps'],
            'additionalProperties': False,
        },
        {
            'steps': [
                {'action': 'goto', 'target': 'kitchen'},
                {'action': 'pick', 'target': 'cup_3'},
                {'action': 'goto', 'target': 'lab'},
                {'action': 'place', 'target': 'shelf_2'},
                {'action': 'inspect', 'target': 'door_1'},
            ]
        },
    ),
}


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    from timebill_ros.core.model import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(model)[0])


def bench_llguidance(tok, schema, ids, vocab):
    """Time our ``Constraint.mask`` (llguidance's mask, unpacked with numpy) as decode runs it."""
    from timebill_ros.core.structured import Grammars

    t0 = time.perf_counter()
    grammars = Grammars(tok, vocab, [tok.eos_token_id])
    grammars.tokenizer
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    c = grammars.constraint(grammars.compile_grammar(json.dumps(schema)))
    compile_s = time.perf_counter() - t0
    per = []
    for t in ids:
        logits = torch.randn(vocab)
        t0 = time.perf_counter()
        c.mask(logits)
        ok = c.accept(t)
        per.append(time.perf_counter() - t0)
        assert ok, c.matcher.get_error()
    return {
        'tokenizer_s': tok_s, 'compile_s': compile_s, 'first_s': per[0], 'per_token_s': per[1:]
    }


def bench_xgrammar(tok, schema, ids, vocab):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(
        json.dumps(schema), any_whitespace=False, separators=(',', ':')
    )
    m = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, vocab)
    logits = torch.randn(1, vocab)
    per = []
    for t in ids:
        t0 = time.perf_counter()
        m.fill_next_token_bitmask(mask)
        xgr.apply_token_bitmask_inplace(logits, mask)
        ok = m.accept_token(t)
        per.append(time.perf_counter() - t0)
        assert ok, f'xgrammar refused token {t}'
    return {
        'tokenizer_s': tok_s, 'compile_s': compile_s, 'first_s': per[0], 'per_token_s': per[1:]
    }


def _ms(xs):
    return {
        'mean_ms': 1e3 * statistics.mean(xs),
        'p50_ms': 1e3 * statistics.median(xs),
        'p90_ms': 1e3 * sorted(xs)[int(0.9 * (len(xs) - 1))],
    }


def bench_engine(rows, repeats: int = 3):
    """Time the served decode with and without a schema on the default engine (C++ step)."""
    from timebill_ros.core.config import TimeBillConfig
    from timebill_ros.core.engine import Engine
    from timebill_ros.core.generation import GenerationRequest

    eng = Engine.from_config(TimeBillConfig())
    prompt = 'List the colours of a traffic light.'
    schema = json.dumps(SCHEMAS['colours'][0])
    out = {}
    for name, kw in (('free', {}), ('schema', {'json_schema': schema})):
        per, n = [], 0
        for _ in range(repeats):
            res = eng.generate(GenerationRequest(prompt=prompt, max_new_tokens=64, **kw))
            per += res.decode_step_s
            n += res.tokens_generated
            text = res.text
        out[name] = {**_ms(per), 'tokens': n, 'text': text, 'step': eng.decode_step}
    rows.append(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--model', default=None, help='tokenizer (default: the config default model)')
    ap.add_argument('--engine', action='store_true', help='also time the served decode step')
    ap.add_argument('--out', default='results/grammar')
    args = ap.parse_args(argv)
    from timebill_ros.core.config import TimeBillConfig

    tok = _tokenizer(args.model or TimeBillConfig().model)
    vocab = max(len(tok), tok.vocab_size)
    table = {}
    for lib, fn in (('llguidance', bench_llguidance), ('xgrammar', bench_xgrammar)):
        try:
            __import__(lib)
        except ImportError:
            print(f'{lib} is not installed: skipped (pip install {lib} to compare)')
            continue
        table[lib] = {}
        for name, (schema, answer) in SCHEMAS.items():
            ids = tok.encode(json.dumps(answer, separators=(',', ':')), add_special_tokens=False)
            r = fn(tok, schema, ids, vocab)
            table[lib][name] = {
                'tokens': len(ids),
                'tokenizer_s': r['tokenizer_s'],
                'compile_s': r['compile_s'],
                'first_mask_s': r['first_s'],
                **_ms(r['per_token_s']),
            }
    print(f'{"library":<11} {"schema":<8} {"tokens":>6} {"compile ms":>10} {"1st mask ms":>11} '
          f'{"mask ms/tok":>11} {"p90":>6}')
    for lib, rows in table.items():
        for name, r in rows.items():
            print(f'{lib:<11} {name:<8} {r["tokens"]:>6} {1e3 * r["compile_s"]:>10.1f} '
                  f'{1e3 * r["first_mask_s"]:>11.1f} {r["mean_ms"]:>11.3f} {r["p90_ms"]:>6.3f}')
    mean = {
        lib: statistics.mean(r['mean_ms'] for r in rows.values()) for lib, rows in table.items()
    }
    result = {'machine': os.uname().machine, 'vocab': vocab, 'mask': table, 'mean_ms': mean}
    if args.engine:
        eng = bench_engine([])
        result['engine'] = eng
        for name, r in eng.items():
            print(f'decode ({r["step"]}) {name:<6}: {r["mean_ms"]:.2f} ms/token '
                  f'(p90 {r["p90_ms"]:.2f}, {r["tokens"]} tokens) -> {r["text"]!r}')
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'grammar.json').write_text(json.dumps(result, indent=2))
    chosen = min(mean, key=mean.get)
    print(' '.join(f'{lib}_ms={ms:.3f}' for lib, ms in mean.items()) + f' fastest={chosen}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
