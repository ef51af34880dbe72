"""Data loading, model definition, training and export for the iris trainer.

Imported lazily by ``trainer.task`` so that flag errors are reported without
paying for the TensorFlow import.  See ``trainer/task.py`` for the contract.
"""

import csv
import io
import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
import keras

FEATURES = ['sepal_length', 'sepal_width', 'petal_length', 'petal_width']
LABEL = 'species'
NUM_CLASSES = 3
CLASS_NAMES = ['setosa', 'versicolor', 'virginica']
SEED = 42
HOLDOUT_FRACTION = 0.2


class DataError(ValueError):
    """The training CSV is missing, malformed or has the wrong columns."""


def load_csv(path):
    """Read the iris CSV (local or gs://) into float32 features, int64 labels."""
    try:
        with tf.io.gfile.GFile(path, 'r') as f:
            text = f.read()
    except tf.errors.OpError as err:
        raise DataError(f'cannot read {path}: {err.message}') from err
    reader = csv.DictReader(io.StringIO(text))
    expected = FEATURES + [LABEL]
    missing = [c for c in expected if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f'{path}: missing column(s) {missing}; expected header '
                        f'{",".join(expected)}')
    xs, ys = [], []
    for lineno, row in enumerate(reader, start=2):
        try:
            xs.append([float(row[c]) for c in FEATURES])
            label = int(row[LABEL])
        except (TypeError, ValueError) as err:
            raise DataError(f'{path}:{lineno}: bad row {row}: {err}') from err
        if not 0 <= label < NUM_CLASSES:
            raise DataError(f'{path}:{lineno}: {LABEL} must be 0..'
                            f'{NUM_CLASSES - 1}, got {label}')
        ys.append(label)
    if len(ys) < 10:
        raise DataError(f'{path}: need at least 10 rows, got {len(ys)}')
    return np.asarray(xs, np.float32), np.asarray(ys, np.int64)


def holdout_split(x, y, fraction=HOLDOUT_FRACTION, seed=SEED):
    order = np.random.RandomState(seed).permutation(len(y))
    n_eval = max(1, int(round(len(y) * fraction)))
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    return (x[train_idx], y[train_idx]), (x[eval_idx], y[eval_idx])


def make_dataset(x, y, batch_size, shuffle):
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(y), seed=SEED, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    options = tf.data.Options()
    # In-memory data: shard by element across multi-worker replicas.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return ds.with_options(options)


def build_model(hidden_units, mean, variance):
    inputs = keras.Input(shape=(len(FEATURES),), name='features')
    h = keras.layers.Normalization(mean=mean, variance=variance,
                                   name='normalize')(inputs)
    for i, units in enumerate(hidden_units):
        h = keras.layers.Dense(units, activation='relu', name=f'hidden_{i}')(h)
    outputs = keras.layers.Dense(NUM_CLASSES, activation='softmax',
                                 name='probabilities')(h)
    return keras.Model(inputs, outputs, name='iris_mlp')


def export_saved_model(model, path):
    """Write a SavedModel whose serving_default takes one scalar per feature."""
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(sepal_length, sepal_width, petal_length, petal_width):
        x = tf.stack([sepal_length, sepal_width, petal_length, petal_width],
                     axis=1)
        probabilities = model(x, training=False)
        return {
            'probabilities': probabilities,
            'class_ids': tf.argmax(probabilities, axis=1,
                                   output_type=tf.int64),
        }

    archive.add_endpoint(
        name='serving_default', fn=serve,
        input_signature=[tf.TensorSpec([None], tf.float32, name=name)
                         for name in FEATURES])
    archive.write_out(path, verbose=False)


class ScalarSummaries:
    """Per-epoch scalar summaries in the layout Keras' TensorBoard callback uses.

    ``train/`` and ``validation/`` runs with tags ``epoch_loss`` and
    ``epoch_accuracy``, written with the core ``tf.summary.write`` op so the
    ``tensorboard`` pip package is not needed (tensorflow-cpu does not pull it
    in); one small write per epoch.  Before the first epoch, ``planned(n)``
    writes the scalar ``planned_epochs`` at step 0 of the ``train/`` run, so a
    reader can show ``epoch k/n`` while the training runs.
    """

    def __init__(self, log_dir):
        self._log_dir = log_dir
        self._writers = {}
        self._metadata = tf.compat.v1.SummaryMetadata(
            plugin_data=tf.compat.v1.SummaryMetadata.PluginData(
                plugin_name='scalars')).SerializeToString()

    def write(self, run, step, values):
        for name, value in values.items():
            self._write(run, step, f'epoch_{name}',
                        tf.constant(value, tf.float32))

    def planned(self, epochs):
        self._write('train', 0, 'planned_epochs',
                    tf.constant(epochs, tf.int64))

    def _write(self, run, step, tag, tensor):
        if run not in self._writers:
            self._writers[run] = tf.summary.create_file_writer(
                os.path.join(self._log_dir, run))
        with self._writers[run].as_default():
            tf.summary.write(tag, tensor, step=step, metadata=self._metadata)
        self._writers[run].flush()

    def close(self):
        for writer in self._writers.values():
            writer.close()


def _cluster_role(strategy):
    """(is_chief, task_type, task_id) for the current process."""
    resolver = getattr(strategy, 'cluster_resolver', None)
    task_type = getattr(resolver, 'task_type', None)
    task_id = getattr(resolver, 'task_id', None) or 0
    if task_type is None:
        return True, None, 0
    if task_type in ('chief', 'master'):
        return True, task_type, task_id
    cluster = resolver.cluster_spec().as_dict()
    has_chief = 'chief' in cluster or 'master' in cluster
    return (task_type == 'worker' and task_id == 0 and not has_chief,
            task_type, task_id)


def _make_steps(strategy, model, optimizer):
    """Distributed train/eval steps returning global (loss_sum, correct, n).

    A custom loop instead of ``model.fit``: Keras 3's fit() does not work with
    a multi-worker MultiWorkerMirroredStrategy (keras-team/keras#20585), and
    one loop for every strategy keeps ``--distribute=none`` and
    ``multiworker`` on the same code path.
    """

    def replica_step(x, y, training):
        with tf.GradientTape() as tape:
            probabilities = model(x, training=training)
            per_example = keras.losses.sparse_categorical_crossentropy(
                y, probabilities)
            local_n = tf.cast(tf.shape(y)[0], tf.float32)
            loss_sum = tf.reduce_sum(per_example)
            if training:
                # Mean over the *global* batch; the optimizer sums the
                # replicas' gradients.
                global_n = tf.distribute.get_replica_context().all_reduce(
                    tf.distribute.ReduceOp.SUM, local_n)
                loss = loss_sum / tf.maximum(global_n, 1.0)
        if training:
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(
                zip(grads, model.trainable_variables, strict=True))
        correct = tf.reduce_sum(tf.cast(
            tf.equal(tf.argmax(probabilities, axis=1), y), tf.float32))
        return loss_sum, correct, local_n

    def make(training):
        @tf.function(reduce_retracing=True)
        def step(batch):
            x, y = batch
            per_replica = strategy.run(replica_step, args=(x, y, training))
            return [strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                    for v in per_replica]
        return step

    return make(True), make(False)


def _run_epoch(step, dist_ds):
    loss_sum = correct = n = 0.0
    for batch in dist_ds:
        batch_loss, batch_correct, batch_n = step(batch)
        loss_sum += float(batch_loss)
        correct += float(batch_correct)
        n += float(batch_n)
    n = max(n, 1.0)
    return {'loss': loss_sum / n, 'accuracy': correct / n}


def train_and_export(args, paths, environ, log):
    if args.distribute == 'multiworker':
        # Must exist before any other TF op runs (collective ops setup).
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        is_chief, task_type, task_id = _cluster_role(strategy)
        role = f'{task_type}:{task_id}' if task_type else 'single process'
        log(f'multiworker: {strategy.num_replicas_in_sync} replica(s); this '
            f'is {role} ({"chief" if is_chief else "non-chief"})')
    else:
        strategy = tf.distribute.get_strategy()  # default (no distribution)
        is_chief, task_id = True, 0

    keras.utils.set_random_seed(SEED)

    x, y = load_csv(args.train_data)
    (x_train, y_train), (x_eval, y_eval) = holdout_split(x, y)
    log(f'data: {len(y_train)} train / {len(y_eval)} held-out rows from '
        f'{args.train_data}')

    # Non-chief workers write everything to a throwaway local directory.
    scratch = None
    if not is_chief:
        scratch = tempfile.mkdtemp(prefix=f'iris-worker{task_id}-')
        paths = {
            'model_dir': os.path.join(scratch, 'model'),
            'metrics_path': os.path.join(scratch, 'metrics.json'),
            'checkpoint_dir': paths['checkpoint_dir'] and os.path.join(
                scratch, 'checkpoints'),
            'tensorboard_dir': paths['tensorboard_dir'] and os.path.join(
                scratch, 'tensorboard'),
        }

    summaries = None
    try:
        with strategy.scope():
            model = build_model(args.hidden_units, x_train.mean(axis=0),
                                x_train.var(axis=0))
            optimizer = keras.optimizers.Adam(learning_rate=args.learning_rate)
            optimizer.build(model.trainable_variables)
        train_step, eval_step = _make_steps(strategy, model, optimizer)
        train_ds = strategy.experimental_distribute_dataset(
            make_dataset(x_train, y_train, args.batch_size, shuffle=True))
        eval_ds = strategy.experimental_distribute_dataset(
            make_dataset(x_eval, y_eval, args.batch_size, shuffle=False))

        if paths['checkpoint_dir']:
            tf.io.gfile.makedirs(paths['checkpoint_dir'])
        if paths['tensorboard_dir']:
            summaries = ScalarSummaries(paths['tensorboard_dir'])
            summaries.planned(args.epochs)

        for epoch in range(args.epochs):
            train_metrics = _run_epoch(train_step, train_ds)
            eval_metrics = _run_epoch(eval_step, eval_ds)
            log(f'epoch {epoch + 1}/{args.epochs}: '
                f'loss={train_metrics["loss"]:.4f} '
                f'accuracy={train_metrics["accuracy"]:.4f} '
                f'val_loss={eval_metrics["loss"]:.4f} '
                f'val_accuracy={eval_metrics["accuracy"]:.4f}')
            if summaries is not None:
                summaries.write('train', epoch, train_metrics)
                summaries.write('validation', epoch, eval_metrics)
            if paths['checkpoint_dir']:
                model.save_weights(os.path.join(
                    paths['checkpoint_dir'],
                    f'ckpt-{epoch + 1:03d}.weights.h5'))

        metrics = {'accuracy': float(eval_metrics['accuracy']),
                   'loss': float(eval_metrics['loss'])}
        log(f'held-out metrics: {json.dumps(metrics)}')

        export_saved_model(model, paths['model_dir'])
        log(f'SavedModel written to {paths["model_dir"]}')

        parent = os.path.dirname(paths['metrics_path'])
        if parent:
            tf.io.gfile.makedirs(parent)
        with tf.io.gfile.GFile(paths['metrics_path'], 'w') as f:
            f.write(json.dumps(metrics))
        log(f'metrics written to {paths["metrics_path"]}')
        return metrics
    finally:
        if summaries is not None:
            summaries.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
