"""
``timebill dataset``: build the response-length prompts and label them with the target model.

Resumable: rerun the same command after an interruption and only missing prompts are labelled.
"""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    from timebill_ros.core.length_data import DEFAULT_LABEL_FILE

    p.add_argument(
        '--model', default='smollm2-135m-instruct', help='target model whose lengths are learned'
    )
    p.add_argument(
        '--out', default=str(DEFAULT_LABEL_FILE), help='JSONL label file (appended, resumable)'
    )
    p.add_argument('--n-prompts', type=int, default=3300, help='how many prompts to build')
    p.add_argument(
        '--max-new-tokens',
        type=int,
        default=512,
        help='label cap; longer answers are stored as capped (raising it on an existing file '
        'relabels only the capped prompts)',
    )
    p.add_argument(
        '--batch-size', type=int, default=64, help='rows decoded together (continuous batching)'
    )
    p.add_argument(
        '--threads', type=int, default=1, help='torch threads (keep 1 on shared machines)'
    )
    p.add_argument(
        '--limit',
        type=int,
        default=3000,
        help='label only the first N prompts of the shuffled list',
    )
    p.add_argument(
        '--loop-span',
        type=int,
        default=64,
        help='stop a row once it repeats one block for '
        'this many tokens (labelled capped); 0 = off',
    )
    p.add_argument(
        '--verify-loops',
        type=int,
        default=0,
        metavar='N',
        help='after labelling, decode N loop-stopped '
        'prompts to the cap to check they do run there',
    )
    p.add_argument('--seed', type=int, default=0)
    p.add_argument(
        '--list', action='store_true', help='print the prompts and their split, label nothing'
    )


def run(args) -> int:
    from timebill_ros.core.length_data import build_prompts, label_file, load_labels, verify_loops

    items = build_prompts(args.n_prompts, seed=args.seed)
    if args.list:
        for it in items:
            print(f'{it.id}\t{it.split}\t{it.template}\t{it.prompt}')
        return 0
    n = label_file(
        args.out,
        args.model,
        items,
        args.max_new_tokens,
        args.batch_size,
        threads=args.threads,
        limit=args.limit,
        loop_span=args.loop_span,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    if args.verify_loops:
        verify_loops(
            args.out,
            args.model,
            args.verify_loops,
            min(args.batch_size, args.verify_loops),
            threads=args.threads,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    recs = load_labels(args.out)
    capped = sum(r['capped'] for r in recs)
    print(f'{args.out}: {n} labels ({capped} capped at {args.max_new_tokens})')
    return 0


if __name__ == '__main__':
    import argparse

    ap = argparse.ArgumentParser(prog='timebill dataset')
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
