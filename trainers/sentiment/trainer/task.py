"""StarChart sentiment trainer: entry point (``python -m trainer.task``).

Trains a small binary text classifier (TextVectorization -> Embedding ->
average pooling -> sigmoid) on the English review corpus shipped in
``trainer/data/reviews.csv`` (columns ``text,label``; label 1 = positive,
0 = negative) and exports a TF SavedModel that takes raw strings.

Environment contract (as set by Vertex AI / Cloud ML Engine):

* ``AIP_MODEL_DIR``            SavedModel destination (local path or gs://).
                               Falls back to ``--model-dir``; one of the two
                               is required.  The environment variable wins
                               when both are given.
* ``AIP_CHECKPOINT_DIR``       if set, Keras weight checkpoints, one per epoch
                               (``ckpt-NNN.weights.h5``) plus the vocabulary
                               (``vocab.txt``) they were trained against.
* ``AIP_TENSORBOARD_LOG_DIR``  if set, per-epoch loss/accuracy scalars
                               (``train/`` and ``validation/`` runs).
* ``CLOUD_ML_JOB_ID``          echoed in the log.
* ``TF_CONFIG``                echoed in the log (training is single-process).

The "train path" is the parent of ``AIP_MODEL_DIR`` unless ``--job-dir`` is
given; ``<train path>/metrics.json`` receives ``{"accuracy": float,
"loss": float}`` measured on a fixed 20% held-out split (seed 42).

Serving signature ``serving_default`` (the TextVectorization vocabulary is
inside the SavedModel, so clients send raw text):

* input:   ``text`` -- string, shape [-1]
* outputs: ``probability`` -- float32 [-1], probability that the text is
  positive; ``label`` -- **string** [-1], ``"positive"`` if
  probability >= 0.5 else ``"negative"``

TF-Serving row format: ``{"instances": [{"text": "great movie"}]}`` or simply
``{"instances": ["great movie"]}``.

Exit status: 0 on success, 2 on bad flags/paths (argparse), 1 on bad data.
"""

import argparse
import json
import os
import posixpath
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
DEFAULT_TRAIN_DATA = os.path.join(DATA_DIR, 'reviews.csv')


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


def build_parser():
    parser = argparse.ArgumentParser(
        prog='python -m trainer.task',
        description='Train the StarChart sentiment classifier.',
        allow_abbrev=False)
    parser.add_argument('--epochs', type=_positive_int, default=10)
    parser.add_argument('--learning_rate', type=_positive_float, default=0.01)
    parser.add_argument('--embedding_dim', type=_positive_int, default=16)
    parser.add_argument('--max_tokens', type=_positive_int, default=2000,
                        help='vocabulary size cap, including the padding and '
                             'OOV tokens')
    parser.add_argument('--batch_size', type=_positive_int, default=32)
    parser.add_argument('--train_data', default=DEFAULT_TRAIN_DATA,
                        help='CSV with columns text,label (local path or '
                             'gs:// URI); default: the shipped reviews.csv')
    parser.add_argument('--job-dir', dest='job_dir', default=None,
                        help='where metrics.json goes (default: parent of '
                             'AIP_MODEL_DIR)')
    parser.add_argument('--model-dir', dest='model_dir', default=None,
                        help='SavedModel destination when AIP_MODEL_DIR is '
                             'unset')
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
    print(f'[sentiment-trainer] {message}', flush=True)


def main(argv=None, environ=None):
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_tokens < 3:
        parser.error('--max_tokens must be >= 3 (padding, OOV and at least '
                     'one word)')
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
