"""StarChart iris trainer: entry point (``python -m trainer.task``).

Trains a small Keras MLP on the iris data set shipped in ``trainer/data``
(150 rows, 4 float features, 3 classes) and exports a TF SavedModel.

Environment contract (as set by Vertex AI / Cloud ML Engine):

* ``AIP_MODEL_DIR``            SavedModel destination (local path or gs://).
                               Falls back to ``--model-dir``; one of the two
                               is required.  The environment variable wins
                               when both are given.
* ``AIP_CHECKPOINT_DIR``       if set, Keras weight checkpoints, one per epoch
                               (``ckpt-NNN.weights.h5``).
* ``AIP_TENSORBOARD_LOG_DIR``  if set, per-epoch loss/accuracy scalars
                               (``train/`` and ``validation/`` runs).
* ``CLOUD_ML_JOB_ID``          echoed in the log.
* ``TF_CONFIG``                cluster spec, used by ``--distribute=multiworker``.

The "train path" is the parent of ``AIP_MODEL_DIR`` unless ``--job-dir`` is
given; ``<train path>/metrics.json`` receives ``{"accuracy": float,
"loss": float}`` measured on a fixed 20% held-out split (seed 42).

Serving signature ``serving_default``:

* inputs:  ``sepal_length``, ``sepal_width``, ``petal_length``,
  ``petal_width`` -- float32, shape [-1] (one scalar per instance, so the
  TF-Serving row format ``{"instances": [{"sepal_length": 5.1, ...}]}`` works)
* outputs: ``probabilities`` float32 [-1, 3] and ``class_ids`` int64 [-1]
  (0 = setosa, 1 = versicolor, 2 = virginica)

With ``--distribute=multiworker`` training runs under
``tf.distribute.MultiWorkerMirroredStrategy`` driven by ``TF_CONFIG`` (no
TF_CONFIG: a single local worker); the chief (task type ``chief``/``master``,
or ``worker`` 0 when the cluster has no chief) writes the SavedModel,
checkpoints, TensorBoard logs and metrics.json to the real locations, the
other workers write theirs to a local temporary directory which is deleted
at exit.  All workers report the same, globally reduced, metrics.  With the
default ``--distribute=none`` TF_CONFIG is only logged.  Training uses a
small custom loop (``model.py``) rather than ``Model.fit`` because Keras 3's
fit() fails under a multi-worker strategy (keras-team/keras#20585).

Exit status: 0 on success, 2 on bad flags/paths (argparse), 1 on bad data.
"""

import argparse
import json
import os
import posixpath
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
DEFAULT_TRAIN_DATA = os.path.join(DATA_DIR, 'iris.csv')


def _positive_int(value):
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'invalid int value: {value!r}') from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f'must be > 0, got {number}')
    return number


def _positive_float(value):
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'invalid float value: {value!r}') from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f'must be > 0, got {value}')
    return number


def _hidden_units(value):
    try:
        units = [int(part) for part in value.split(',') if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'expected comma-separated ints like "16,8", got {value!r}'
        ) from None
    if not units or any(u <= 0 for u in units):
        raise argparse.ArgumentTypeError(
            f'expected comma-separated positive ints like "16,8", got {value!r}')
    return units


def build_parser():
    parser = argparse.ArgumentParser(
        prog='python -m trainer.task',
        description='Train the StarChart iris classifier.',
        allow_abbrev=False)
    parser.add_argument('--epochs', type=_positive_int, default=30)
    parser.add_argument('--learning_rate', type=_positive_float, default=0.01)
    parser.add_argument('--hidden_units', type=_hidden_units, default=[16, 8],
                        help='comma-separated layer sizes (default "16,8")')
    parser.add_argument('--batch_size', type=_positive_int, default=16)
    parser.add_argument('--train_data', default=DEFAULT_TRAIN_DATA,
                        help='CSV (local path or gs:// URI); default: the '
                             'shipped iris.csv')
    parser.add_argument('--job-dir', dest='job_dir', default=None,
                        help='where metrics.json goes (default: parent of '
                             'AIP_MODEL_DIR)')
    parser.add_argument('--model-dir', dest='model_dir', default=None,
                        help='SavedModel destination when AIP_MODEL_DIR is '
                             'unset')
    parser.add_argument('--distribute', choices=['none', 'multiworker'],
                        default='none')
    return parser


def parent_dir(path):
    """Parent of ``path`` (local or gs://), ignoring a trailing slash."""
    stripped = path.rstrip('/')
    if not stripped:
        return '/'
    _, sep, rest = stripped.partition('://')
    if sep and '/' not in rest:
        return stripped  # gs://bucket has no parent; use the bucket itself
    return posixpath.dirname(stripped) or '.'


def resolve_paths(args, environ, parser):
    model_dir = environ.get('AIP_MODEL_DIR') or args.model_dir
    if not model_dir:
        parser.error('no model directory: set AIP_MODEL_DIR or pass '
                     '--model-dir')
    train_path = args.job_dir or parent_dir(model_dir)
    return {
        'model_dir': model_dir,
        'train_path': train_path,
        'metrics_path': posixpath.join(train_path.rstrip('/') or '/',
                                       'metrics.json'),
        'checkpoint_dir': environ.get('AIP_CHECKPOINT_DIR') or None,
        'tensorboard_dir': environ.get('AIP_TENSORBOARD_LOG_DIR') or None,
    }


def log(message):
    print(f'[iris-trainer] {message}', flush=True)


def main(argv=None, environ=None):
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    paths = resolve_paths(args, environ, parser)

    # Cheap check for local paths before paying for the TensorFlow import.
    if '://' not in args.train_data and not os.path.isfile(args.train_data):
        parser.error(f'--train_data: file not found: {args.train_data}')

    if environ.get('CLOUD_ML_JOB_ID'):
        log(f'job id: {environ["CLOUD_ML_JOB_ID"]}')
    if environ.get('TF_CONFIG'):
        log(f'TF_CONFIG: {environ["TF_CONFIG"]}')
    log(f'args: {json.dumps(vars(args), sort_keys=True)}')
    log(f'paths: {json.dumps(paths, sort_keys=True)}')

    from trainer import model  # imports TensorFlow

    if '://' in args.train_data:
        try:
            found = model.tf.io.gfile.exists(args.train_data)
        except model.tf.errors.OpError as err:
            parser.error(f'--train_data: cannot access {args.train_data}: '
                         f'{err.message}')
        if not found:
            parser.error(f'--train_data: file not found: {args.train_data}')

    try:
        metrics = model.train_and_export(args, paths, environ, log)
    except model.DataError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(json.dumps(metrics), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
