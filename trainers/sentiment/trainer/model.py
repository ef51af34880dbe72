"""Data loading, model definition, training and export for the sentiment trainer.

Imported lazily by ``trainer.task`` so that flag errors are reported without
paying for the TensorFlow import.  See ``trainer/task.py`` for the contract.
"""

import csv
import io
import json
import os

import numpy as np
import tensorflow as tf
import keras

TEXT = 'text'
LABEL = 'label'
LABEL_NAMES = ['negative', 'positive']
SEED = 42
HOLDOUT_FRACTION = 0.2
SEQUENCE_LENGTH = 48  # unigram+bigram ids kept per text (sentences are short)


class DataError(ValueError):
    """The training CSV is missing, malformed or has the wrong columns."""


def load_csv(path):
    """Read the reviews CSV (local or gs://) into str texts, int64 labels."""
    try:
        with tf.io.gfile.GFile(path, 'r') as f:
            content = f.read()
    except tf.errors.OpError as err:
        raise DataError(f'cannot read {path}: {err.message}') from err
    reader = csv.DictReader(io.StringIO(content))
    missing = [c for c in (TEXT, LABEL) if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f'{path}: missing column(s) {missing}; expected header '
                        f'{TEXT},{LABEL}')
    texts, labels = [], []
    for lineno, row in enumerate(reader, start=2):
        try:
            label = int(row[LABEL])
        except (TypeError, ValueError) as err:
            raise DataError(f'{path}:{lineno}: bad label {row[LABEL]!r}: '
                            f'{err}') from err
        if label not in (0, 1):
            raise DataError(f'{path}:{lineno}: {LABEL} must be 0 or 1, got '
                            f'{label}')
        texts.append(row[TEXT] or '')
        labels.append(label)
    if len(labels) < 10:
        raise DataError(f'{path}: need at least 10 rows, got {len(labels)}')
    return np.asarray(texts, dtype=object), np.asarray(labels, np.int64)


def holdout_split(x, y, fraction=HOLDOUT_FRACTION, seed=SEED):
    order = np.random.RandomState(seed).permutation(len(y))
    n_eval = max(1, int(round(len(y) * fraction)))
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    return (x[train_idx], y[train_idx]), (x[eval_idx], y[eval_idx])


def build_vectorizer(texts, max_tokens):
    vectorizer = keras.layers.TextVectorization(
        max_tokens=max_tokens, output_mode='int', ngrams=2,
        output_sequence_length=SEQUENCE_LENGTH, name='vectorize')
    vectorizer.adapt(tf.constant(texts.tolist(), tf.string), batch_size=256)
    return vectorizer


def token_ids(vectorizer, texts):
    """Vectorize a [batch] string tensor into [batch, SEQUENCE_LENGTH] ids.

    Texts with no tokens at all (e.g. "") would be fully masked and make the
    masked average NaN, so they are mapped to a single OOV token (id 1), i.e.
    treated like text made only of unknown words.
    """
    ids = vectorizer(texts)
    empty = tf.reduce_all(tf.equal(ids, 0), axis=1, keepdims=True)
    oov_only = tf.one_hot([0], SEQUENCE_LENGTH, dtype=ids.dtype)  # [1, L]
    return tf.where(empty, oov_only, ids)


def build_model(vocab_size, embedding_dim, learning_rate):
    model = keras.Sequential([
        keras.Input(shape=(SEQUENCE_LENGTH,), dtype='int64', name='token_ids'),
        keras.layers.Embedding(vocab_size, embedding_dim, mask_zero=True,
                               name='embedding'),
        keras.layers.GlobalAveragePooling1D(name='average'),
        keras.layers.Dense(1, activation='sigmoid', name='probability'),
    ], name='sentiment_bow')
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name='accuracy')])
    return model


def make_dataset(token_ids, labels, batch_size, shuffle):
    ds = tf.data.Dataset.from_tensor_slices((token_ids, labels))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=SEED, reshuffle_each_iteration=True)
    return ds.batch(batch_size)


def export_saved_model(vectorizer, model, path):
    """SavedModel whose serving_default maps raw strings to probability/label."""
    archive = keras.export.ExportArchive()
    archive.track(vectorizer)  # vocabulary lookup table
    archive.track(model)
    label_names = tf.constant(LABEL_NAMES)

    def serve(text):
        ids = token_ids(vectorizer, text)
        probability = tf.reshape(model(ids, training=False), [-1])
        label = tf.gather(label_names,
                          tf.cast(probability >= 0.5, tf.int32))
        return {'probability': probability, 'label': label}

    archive.add_endpoint(
        name='serving_default', fn=serve,
        input_signature=[tf.TensorSpec([None], tf.string, name='text')])
    archive.write_out(path, verbose=False)


class ScalarSummaries(keras.callbacks.Callback):
    """Per-epoch scalar summaries in the layout Keras' TensorBoard callback uses.

    ``train/`` and ``validation/`` runs with tags ``epoch_loss`` and
    ``epoch_accuracy``, written with the core ``tf.summary.write`` op so the
    ``tensorboard`` pip package is not needed (tensorflow-cpu does not pull it
    in); one small write per epoch.  When training begins, the scalar
    ``planned_epochs`` at step 0 of the ``train/`` run says how many epochs
    ``fit`` was asked for, so a reader can show ``epoch k/n``.
    """

    def __init__(self, log_dir):
        super().__init__()
        self._log_dir = log_dir
        self._writers = {}
        self._metadata = tf.compat.v1.SummaryMetadata(
            plugin_data=tf.compat.v1.SummaryMetadata.PluginData(
                plugin_name='scalars')).SerializeToString()

    def on_train_begin(self, logs=None):
        epochs = (self.params or {}).get('epochs')
        if epochs:
            self._write('train', 0, 'planned_epochs',
                        tf.constant(int(epochs), tf.int64))
        for writer in self._writers.values():
            writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            run, name = (('validation', key[4:]) if key.startswith('val_')
                         else ('train', key))
            self._write(run, epoch, f'epoch_{name}',
                        tf.constant(float(value), tf.float32))
        for writer in self._writers.values():
            writer.flush()

    def _write(self, run, step, tag, tensor):
        if run not in self._writers:
            self._writers[run] = tf.summary.create_file_writer(
                os.path.join(self._log_dir, run))
        with self._writers[run].as_default():
            tf.summary.write(tag, tensor, step=step, metadata=self._metadata)

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()


def train_and_export(args, paths, environ, log):
    keras.utils.set_random_seed(SEED)

    texts, labels = load_csv(args.train_data)
    (x_train, y_train), (x_eval, y_eval) = holdout_split(texts, labels)
    log(f'data: {len(y_train)} train / {len(y_eval)} held-out rows from '
        f'{args.train_data}')

    # The vocabulary is learned from the training split only.
    vectorizer = build_vectorizer(x_train, args.max_tokens)
    vocab_size = vectorizer.vocabulary_size()
    log(f'vocabulary: {vocab_size} tokens (max_tokens={args.max_tokens})')

    def vectorize(x):
        return token_ids(vectorizer, tf.constant(x.tolist(), tf.string)).numpy()

    train_ds = make_dataset(vectorize(x_train), y_train.astype(np.float32),
                            args.batch_size, shuffle=True)
    eval_ds = make_dataset(vectorize(x_eval), y_eval.astype(np.float32),
                           args.batch_size, shuffle=False)

    model = build_model(vocab_size, args.embedding_dim, args.learning_rate)

    callbacks = []
    if paths['checkpoint_dir']:
        tf.io.gfile.makedirs(paths['checkpoint_dir'])
        with tf.io.gfile.GFile(os.path.join(paths['checkpoint_dir'],
                                            'vocab.txt'), 'w') as f:
            f.write('\n'.join(vectorizer.get_vocabulary()) + '\n')
        callbacks.append(keras.callbacks.ModelCheckpoint(
            os.path.join(paths['checkpoint_dir'], 'ckpt-{epoch:03d}.weights.h5'),
            save_weights_only=True, save_freq='epoch'))
    if paths['tensorboard_dir']:
        callbacks.append(ScalarSummaries(paths['tensorboard_dir']))

    model.fit(train_ds, validation_data=eval_ds, epochs=args.epochs,
              callbacks=callbacks, shuffle=False, verbose=2)

    results = model.evaluate(eval_ds, return_dict=True, verbose=0)
    metrics = {'accuracy': float(results['accuracy']),
               'loss': float(results['loss'])}
    log(f'held-out metrics: {json.dumps(metrics)}')

    export_saved_model(vectorizer, model, paths['model_dir'])
    log(f'SavedModel written to {paths["model_dir"]}')

    parent = os.path.dirname(paths['metrics_path'])
    if parent:
        tf.io.gfile.makedirs(parent)
    with tf.io.gfile.GFile(paths['metrics_path'], 'w') as f:
        f.write(json.dumps(metrics))
    log(f'metrics written to {paths["metrics_path"]}')
    return metrics
