"""
``timebill generate "PROMPT" [--alpha A | --budget S]``: try the engine by hand, no ROS.

The request runs through the same pipeline as a goal sent to the nodes: with ``--budget`` and
no ``--alpha``, α is chosen after prefill the TimeBill way, from the calibrated profile
(``timebill calibrate``; built-in pessimistic coefficients until then) and the predicted length
(``--predicted-length``, else the trained length predictor beside prefill, else N_max).

``--json-schema FILE`` (or ``--grammar FILE``, Lark) constrains the answer token by token
(llguidance); stdout then holds only the answer, printed as JSON (``json.loads`` reads it), and
everything else goes to stderr. ``--overrun close`` closes an answer running out of time into a
shorter valid one instead of cutting it.
"""

from __future__ import annotations

import json
from pathlib import Path
import sys
import time

from timebill_ros.core.config import OVERRUN_POLICIES

from .options import add_config_arguments, add_structured_arguments, load_config, PressNames


def add_arguments(p):
    p.add_argument('prompt')
    p.add_argument('--system', default=None, help='system prompt')
    p.add_argument('--alpha', type=float, default=None, help='fixed KV eviction ratio in [0, 1)')
    p.add_argument('--budget', type=float, default=None, help='time budget in seconds from now')
    p.add_argument(
        '--predicted-length', type=int, default=None, help='N̂ to use instead of the predictor'
    )
    p.add_argument('--max-new-tokens', type=int, default=None)
    p.add_argument(
        '--min-quality',
        type=float,
        default=-1.0,
        help="expected-accuracy floor with --budget (-1: the config's default, 0: none)",
    )
    p.add_argument(
        '--max-alpha', type=float, default=-1.0, help='most eviction allowed (-1: no cap)'
    )
    p.add_argument(
        '--overrun',
        choices=OVERRUN_POLICIES,
        default=None,
        help='at the deadline: kill | truncate | close (a schema answer closed valid) | skip-next',
    )
    add_structured_arguments(p, '; prints JSON')
    p.add_argument(
        '--press',
        choices=PressNames(),
        metavar='PRESS',  # a metavar keeps argparse from listing (importing) them up front
        help="eviction press: %(choices)s (default: the config's)",
    )
    add_config_arguments(p, 'params YAML (default: config/timebill.yaml)')
    p.add_argument('--no-stream', action='store_true', help='print only the final result')


def read_schema(spec: str) -> str:
    """Return the JSON schema text of ``--json-schema``: a file's content, or inline JSON."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text(encoding='utf-8')
    if spec.lstrip().startswith('{') or spec.strip() in ('true', 'false'):
        return spec
    raise OSError(f'no such file: {spec}')


def run(args) -> int:
    from timebill_ros.core.calibration.store import profile_key, time_model_for
    from timebill_ros.core.engine import Engine
    from timebill_ros.core.errors import TimeBillError
    from timebill_ros.core.job import Job
    from timebill_ros.core.lengths import FixedLength, PredictorLength
    from timebill_ros.core.pipeline import Pipeline

    cfg = load_config(args)  # --config, then --model/--dtype/--device/--threads
    overrides = {
        k: v
        for k, v in (
            ('press', args.press),
            ('max_new_tokens', args.max_new_tokens),
            ('overrun_policy', args.overrun),
        )
        if v is not None
    }
    cfg = cfg.replace(**overrides)
    say = lambda m: print(f'--- {m}', file=sys.stderr)  # noqa: E731
    try:
        json_schema = read_schema(args.json_schema) if args.json_schema else ''
        grammar = Path(args.grammar).expanduser().read_text('utf-8') if args.grammar else ''
    except OSError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    structured = bool(json_schema or grammar)
    prompt = args.prompt
    if json_schema and cfg.schema_in_prompt:  # the model and the predictor see the form asked
        from timebill_ros.core.structured import with_schema

        prompt = with_schema(prompt, json_schema)
    engine = Engine.from_config(cfg)
    try:
        ids = engine.encode(prompt, args.system)
    except TimeBillError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    model, _ = time_model_for(cfg, profile_key(engine), log=say)
    if args.predicted_length is not None or args.budget is None or args.alpha is not None:
        lengths = FixedLength(args.predicted_length)
    else:  # the predictor falls back to N_max itself when it has no checkpoint
        from timebill_ros.core.length_predictor import load_length_predictor

        lengths = PredictorLength(load_length_predictor(cfg))
    pipeline = Pipeline(engine, model, cfg, lengths, learn=False)
    printed = [0]

    # a structured answer streams to stderr: stdout holds only the whole answer, parseable
    stream = sys.stderr if structured else sys.stdout

    def on_token(step, token, text):
        if not args.no_stream:
            stream.write(text[printed[0]:])
            stream.flush()
            printed[0] = len(text)

    start = time.monotonic()
    job = Job(
        request_id='cli',
        input_ids=ids,
        prompt=prompt,
        system_prompt=args.system or '',
        deadline=start + args.budget if args.budget is not None else float('inf'),
        accepted_at=start,
        max_new_tokens=cfg.max_new_tokens,
        alpha=args.alpha,
        min_quality=args.min_quality,
        max_alpha=args.max_alpha,
        json_schema=json_schema,
        grammar=grammar,
        on_token=on_token,
    )
    out = pipeline.run(job)
    pipeline.close()
    if structured:
        if not args.no_stream:
            print(file=sys.stderr)
        if out.valid:
            try:
                print(json.dumps(json.loads(out.text), indent=2, ensure_ascii=False))
            except ValueError:  # a Lark grammar's answer need not be JSON: as it is
                print(out.text)
    elif not args.no_stream:
        print()
    else:
        print(out.text)
    res = out.result
    steps = res.decode_step_s if res is not None else []
    per_tok = 1000 * sum(steps) / len(steps) if steps else float('nan')
    say(f'{out.status}: {out.reason}')
    if structured:
        say(f'valid={out.valid}' + ('' if out.valid else ' (no answer printed on stdout)'))
    say(
        f'completed={out.completed} deadline_met={out.deadline_met} alpha={out.alpha:.3f} '
        f'(limit {out.alpha_limit:.2f}, expected quality {out.expected_quality:.2f}) '
        f'N̂={out.predicted_length} kv {out.kv_before}->{out.kv_after} '
        f'tokens={out.tokens_generated} '
        f'prefill={out.prefill_s:.3f}s decode={out.decode_s:.3f}s ({per_tok:.1f} ms/token) '
        f'total={out.total_s:.3f}s'
    )
    answered = out.status in ('succeeded', 'truncated') and (out.valid or not structured)
    return 0 if answered else 1
