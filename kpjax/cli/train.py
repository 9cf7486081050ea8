"""`python -m kpjax.train --config configs/X.py --workdir DIR [--config.FIELD=VALUE ...]`: trains, evaluates,
checkpoints and resumes (kpjax.train.loop.train_and_evaluate)."""

from __future__ import annotations

import sys

from kpjax.cli import common
from kpjax.train import distributed
from kpjax.train import loop


def _train(args) -> int:
  distributed.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                  args.initialization_timeout)
  try:
    result = loop.train_and_evaluate(args.config, args.workdir)
  except KeyboardInterrupt:  # a second Ctrl-C: gave up without saving
    return common.report('interrupted before a checkpoint could be saved; the last saved checkpoint is kept',
                      common.INTERRUPTED)
  figures = [f', {k} {v:.4f}' for k, v in result.items() if k.startswith('eval/') and v is not None]
  summary = f'step {result["step"]}' + ''.join(figures)  # eval/ne (COCO data: also eval/ap)
  if result['stopped_by'] is not None:  # the conventional status of a process ended by a signal
    print(f'stopped: {summary}', flush=True)
    return 128 + int(result['stopped_by'])
  print(f'done: {summary}', flush=True)
  return common.OK


def main(argv=None) -> int:
  """`python -m kpjax.train --config configs/X.py --workdir DIR [--config.FIELD=VALUE ...]`."""
  parser = common.ArgumentParser(prog='python -m kpjax.train', description=loop.__doc__.split('\n\n')[0])
  parser.add_config_flag(help_text='the training config, e.g. configs/trousers.py; --config.FIELD=VALUE '
                         'overrides its fields (e.g. --config.batch_size=8)')
  parser.add_argument('--workdir', required=True, help='directory for checkpoints, metrics and pictures '
                      '(rerunning the same command resumes from it)')
  parser.add_argument('--coordinator_address', help='host:port of process 0 (multi-process runs where the '
                      'cluster is not detected: SLURM, Open MPI and TPU pods are)')
  parser.add_argument('--num_processes', type=int, help='number of processes (with --coordinator_address)')
  parser.add_argument('--process_id', type=int, help='this process index (with --coordinator_address)')
  parser.add_argument('--initialization_timeout', type=int, default=distributed.DEFAULT_INITIALIZATION_TIMEOUT_S,
                      help='seconds a multi-process run waits for all its processes to join before it fails')
  args = common.parse(parser, argv)
  from kpjax.cli import supervise  # pylint: disable=g-import-not-at-top
  if not supervise.is_supervised():
    try:
      run = distributed.requested_run(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as e:
      common.error(str(e))
    if run is not None:  # JAX's runtime aborts on some failures: a child process runs it, this one reports
      return supervise.run_supervised('kpjax.train', sys.argv[1:] if argv is None else argv, run)
  return common.run(_train, args)

