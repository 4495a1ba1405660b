"""TFF's "Federated Learning for Image Classification", on phones through Overnight.

The tutorial's model (a single softmax layer on the flattened image, zero-initialised), its
optimizers (client SGD at 0.02, server SGD at 1.0), 10 clients reused every round, 5 local
epochs of batches of 20, 10 rounds. It prints each round's metrics as `next` returns them,
writes the training metrics for TensorBoard, and ends with an evaluation of the final model
on held-out writers.

    python examples/image_classification.py [--emnist-dir DIR] [--quick] [--server HOST:PORT]
"""

from __future__ import annotations

import collections
import pathlib

import tutorial_support as tutorial

NUM_CLIENTS = 10
NUM_EPOCHS = 5
BATCH_SIZE = 20
NUM_ROUNDS = 10


def main() -> None:
    options = tutorial.parser(__doc__, rounds=NUM_ROUNDS, phones=NUM_CLIENTS)
    options.add_argument("--logdir", type=pathlib.Path, default=pathlib.Path("/tmp/logs/scalars"))
    args = options.parse_args()
    epochs = NUM_EPOCHS
    if args.quick:
        args.rounds, args.phones, epochs = 2, 4, 1
    deadlines = tutorial.deadlines(args)
    data = tutorial.load(args)

    import tensorflow as tf
    import tensorflow_federated as tff

    def model_fn() -> tf.keras.Model:
        # The tutorial flattens in its preprocessing; here the model does, so phones keep
        # their images as they are.
        return tf.keras.models.Sequential(
            [
                tf.keras.layers.Flatten(input_shape=data.image_shape),
                tf.keras.layers.Dense(data.num_classes, kernel_initializer="zeros"),
                tf.keras.layers.Softmax(),
            ]
        )

    with tutorial.coordinator(args, data) as deployment:
        task = deployment.client.create_task(
            tutorial.task_id("image-classification"),
            population=args.population,
            model=model_fn,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(),
            client_optimizer=lambda: tf.keras.optimizers.SGD(learning_rate=0.02),
            server_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
            rounds=args.rounds,
            clients_per_round=min(NUM_CLIENTS, args.phones),
            over_selection=1.0,  # the same clients every round, as in the tutorial
            epochs=epochs,
            batch_size=BATCH_SIZE,
            selection_deadline_s=deadlines.selection_s,
            reporting_deadline_s=deadlines.reporting_s,
        )
        summary_writer = tf.summary.create_file_writer(str(args.logdir / "training"))
        with summary_writer.as_default(), deployment.phones():
            for result in task.rounds(progress=False):
                if not result.committed:
                    print(f"round {result.round_number:2d} {result.state}: retried")
                    continue
                metrics = result.tff_metrics
                print(f"round {result.round_number:2d}, metrics={metrics}", flush=True)
                for name, value in metrics["client_work"]["train"].items():
                    tf.summary.scalar(name, value, step=result.round_number)
        summary_writer.flush()
        print(f"TensorBoard: tensorboard --logdir {args.logdir}")

        evaluation = task.evaluate(data.test.x, data.test.y)
        eval_metrics = collections.OrderedDict(
            eval=collections.OrderedDict(
                num_examples=float(len(data.test.y)),
                loss=evaluation.loss,
                accuracy=evaluation.accuracy,
            )
        )
        print(eval_metrics)


if __name__ == "__main__":
    main()
