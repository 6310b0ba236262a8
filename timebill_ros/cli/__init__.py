"""
``timebill`` console script: one subcommand a module, imported only when used.

Each module named in COMMANDS defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported lazily so `timebill --help` is instant.
COMMANDS = {
    'generate': (
        'timebill_ros.cli.generate',
        'run one prompt through the engine with a budget / alpha',
    ),
    'bringup': (
        'timebill_ros.cli.bringup',
        'start the TimeBill ROS nodes and drive the server to active',
    ),
    'ask': (
        'timebill_ros.cli.ask',
        'send one time-budgeted goal to the running nodes and stream the answer',
    ),
    'prime': (
        'timebill_ros.cli.prime',
        "load a standing context into the generator's prefix KV cache (or --release it)",
    ),
    'calibrate': (
        'timebill_ros.cli.calibrate',
        'profile prefill/decode timings and fit the execution-time estimator',
    ),
    'replay': (
        'timebill_ros.cli.replay',
        'replay the requests in a bag against a server (or --offline) and report',
    ),
    'eval': (
        'timebill_ros.cli.evaluate',
        'budget x policy benchmark: completion rate and score per budget (--quick)',
    ),
    'make-tasks': (
        'timebill_ros.cli.make_tasks',
        'write the long-context benchmark tasks as a request bag',
    ),
    'dataset': (
        'timebill_ros.cli.dataset',
        'build response-length prompts and label them with the target model',
    ),
    'train-predictor': (
        'timebill_ros.cli.train_predictor',
        'train the response length predictor (--if-missing)',
    ),
    'eval-predictor': (
        'timebill_ros.cli.eval_predictor',
        'MAE/RMSE/R2 of length predictors vs baselines, latency, plot',
    ),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog='timebill', description='Time-budgeted LLM inference (TimeBill).'
    )
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == '__main__':
    sys.exit(main())
