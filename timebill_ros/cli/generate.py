"""``timebill generate "PROMPT" [--alpha A | --budget S]``: try the engine by hand, no ROS.

With ``--budget`` and no ``--alpha``, α is chosen after prefill the TimeBill way, from the
calibrated profile (``timebill calibrate``) and the predicted length (``--predicted-length``,
else the trained length predictor, else the conservative N_max fallback).
"""

from __future__ import annotations

import sys
import time


def add_arguments(p):
    p.add_argument("prompt")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--alpha", type=float, default=None, help="fixed KV eviction ratio in [0, 1)")
    p.add_argument("--budget", type=float, default=None, help="time budget in seconds from now")
    p.add_argument("--predicted-length", type=int, default=None, help="N̂ to use instead of the predictor")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--overrun", choices=["kill", "truncate"], default=None)
    p.add_argument("--press", default=None, help="eviction press (none, snapkv, streaming_llm)")
    p.add_argument("--config", default=None, help="params YAML (default: config/timebill.yaml)")
    p.add_argument("--model", default=None, help="model alias, HF directory, .gguf file or hub id")
    p.add_argument("--no-stream", action="store_true", help="print only the final result")


def run(args) -> int:
    from timebill_ros.cli import load_config
    from timebill_ros.core.engine import Engine, GenerationRequest
    from timebill_ros.core.errors import TimeBillError

    cfg = load_config(args)  # --config, --model
    overrides = {k: v for k, v in (("press", args.press), ("max_new_tokens", args.max_new_tokens),
                                   ("overrun_policy", args.overrun)) if v is not None}
    cfg = cfg.replace(**overrides)
    engine = Engine.from_config(cfg)
    start = time.monotonic()
    deadline = start + args.budget if args.budget is not None else None
    printed = [0]

    def on_token(step, token, text):
        if not args.no_stream:
            sys.stdout.write(text[printed[0]:])
            sys.stdout.flush()
            printed[0] = len(text)

    request = GenerationRequest(prompt=args.prompt, system_prompt=args.system, max_new_tokens=cfg.max_new_tokens,
                                deadline=deadline, alpha=args.alpha, overrun=cfg.overrun_policy, on_token=on_token)
    chooser = None
    if args.alpha is None and deadline is not None:
        chooser = _alpha_chooser(cfg, engine, deadline, args.predicted_length, args.prompt)
    try:
        result = engine.generate(request, choose_alpha=chooser)
    except TimeBillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.no_stream:
        print()
    else:
        print(result.text)
    steps = result.decode_step_s
    per_tok = 1000 * sum(steps) / len(steps) if steps else float("nan")
    print(f"--- {result.stop_reason}; completed={result.completed} deadline_met={result.deadline_met} "
          f"alpha={result.alpha:.3f} kv {result.kv_before}->{result.kv_after} tokens={result.tokens_generated} "
          f"prefill={result.prefill_s:.3f}s decode={sum(steps):.3f}s ({per_tok:.1f} ms/token) "
          f"total={result.total_s:.3f}s", file=sys.stderr)
    if chooser is not None and chooser.verdict is not None:
        print(f"--- solver: {chooser.verdict.status}: {chooser.verdict.reason}", file=sys.stderr)
    return 0


def _alpha_chooser(cfg, engine, deadline, predicted_length, prompt):
    from timebill_ros.core.budget import make_alpha_chooser
    from timebill_ros.core.calibration import load_time_model

    model = load_time_model(cfg, engine.profile_key())
    if model is None:
        print("--- no timing profile for this setup: run `timebill calibrate` to let the budget choose alpha; "
              "using alpha=0", file=sys.stderr)
        return None
    n_hat = predicted_length
    if n_hat is None:  # the predictor falls back to N_max itself when it has no checkpoint
        from timebill_ros.core.length_predictor import load_length_predictor

        n_hat = load_length_predictor(cfg).predict(prompt).n_hat
        print(f"--- predicted response length N̂ = {n_hat}", file=sys.stderr)
    return make_alpha_chooser(model, deadline, n_hat, k=cfg.pessimism_k, n_max=cfg.n_max, alpha_max=cfg.alpha_max,
                              max_new_tokens=cfg.max_new_tokens, max_context=engine.max_context)
