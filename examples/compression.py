"""TFF's "TFF for Federated Learning Research: Model and Update Compression" tutorial
(`tff.learning.compression_aggregator`), on phones through Overnight.

The tutorial's CNN (the original FedAvg CNN), client SGD at 0.02, server SGD at 1.0, one local
epoch of batches of 20, 10 clients per round for 10 rounds, trained twice: with the default
weighted mean, then with `tff.learning.compression_aggregator()`. Each round prints its
training metrics and the bits broadcast and aggregated so far; both runs go to TensorBoard
(`--logdir`, as the tutorial's /tmp/logs/scalars/{original,compression}).

    python examples/compression.py [--emnist-dir DIR] [--quick] [--server HOST:PORT]
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import tutorial_support as tutorial

CLIENT_EPOCHS_PER_ROUND = 1
CLIENT_BATCH_SIZE = 20
NUM_CLIENTS_PER_ROUND = 10
NUM_ROUNDS = 10


def main() -> None:
    options = tutorial.parser(__doc__, rounds=NUM_ROUNDS, phones=50)
    options.add_argument("--logdir", type=pathlib.Path, default=pathlib.Path("/tmp/logs/scalars"))
    args = options.parse_args()
    clients_per_round = NUM_CLIENTS_PER_ROUND
    # The quick model keeps one tensor above compression_aggregator's 20,000-element
    # threshold, so compression still shows in aggregated_bits.
    filters, dense_units = (32, 64), 512
    if args.quick:
        args.rounds, args.phones, clients_per_round, filters = 2, 4, 3, (8, 16)
    deadlines = tutorial.deadlines(args)
    data = tutorial.load(args)

    import tensorflow as tf
    import tensorflow_federated as tff

    def create_original_fedavg_cnn_model() -> tf.keras.Model:
        """The CNN used in https://arxiv.org/abs/1602.05629."""
        max_pool = functools.partial(tf.keras.layers.MaxPooling2D, pool_size=(2, 2), padding="same")
        conv2d = functools.partial(
            tf.keras.layers.Conv2D, kernel_size=5, padding="same", activation=tf.nn.relu
        )
        height, width = data.image_shape
        return tf.keras.models.Sequential(
            [
                tf.keras.layers.InputLayer(input_shape=(height, width)),
                # The tutorial adds the channel axis in its preprocessing (expand_dims).
                tf.keras.layers.Reshape((height, width, 1)),
                conv2d(filters=filters[0]),
                max_pool(),
                conv2d(filters=filters[1]),
                max_pool(),
                tf.keras.layers.Flatten(),
                tf.keras.layers.Dense(dense_units, activation=tf.nn.relu),
                tf.keras.layers.Dense(data.num_classes),
                tf.keras.layers.Softmax(),
            ]
        )

    with tutorial.coordinator(args, data) as deployment:

        def train(name: str, model_aggregator: Any) -> None:
            """Trains one task and prints and logs its metrics, as the tutorial's train()."""
            task = deployment.client.create_task(
                tutorial.task_id(f"compression-tutorial-{name}"),
                population=args.population,
                model=create_original_fedavg_cnn_model,
                loss=tf.keras.losses.SparseCategoricalCrossentropy(),
                client_optimizer=lambda: tf.keras.optimizers.SGD(learning_rate=0.02),
                server_optimizer=lambda: tf.keras.optimizers.SGD(learning_rate=1.0),
                aggregator=model_aggregator,
                rounds=args.rounds,
                clients_per_round=clients_per_round,
                epochs=CLIENT_EPOCHS_PER_ROUND,
                batch_size=CLIENT_BATCH_SIZE,
                selection_deadline_s=deadlines.selection_s,
                reporting_deadline_s=deadlines.reporting_s,
            )
            print(f"training {name}: task {task.task_id}", flush=True)
            summary_writer = tf.summary.create_file_writer(str(args.logdir / name))
            with summary_writer.as_default(), deployment.phones():
                for result in task.rounds(progress=False):
                    if not result.committed:
                        print(f"round {result.round_number} {result.state}: retried")
                        continue
                    metrics = result.tff_metrics
                    train_metrics = metrics["client_work"]["train"]
                    print(
                        f"round {result.round_number}, train_metrics={train_metrics}, "
                        f"broadcasted_bits={tutorial.format_size(metrics['broadcasted_bits'])}, "
                        f"aggregated_bits={tutorial.format_size(metrics['aggregated_bits'])}",
                        flush=True,
                    )
                    for metric, value in train_metrics.items():
                        tf.summary.scalar(metric, value, step=result.round_number)
                    for metric in ("broadcasted_bits", "aggregated_bits"):
                        tf.summary.scalar(metric, metrics[metric], step=result.round_number)
            summary_writer.flush()

        train("original", None)  # None: TFF's default, the weighted mean
        train("compression", tff.learning.compression_aggregator())
    print(f"TensorBoard: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
