"""Metrics in TensorBoard, as "Implementing Federated Learning with TensorFlow: Metric
Improvements", on phones through Overnight.

The article's model (one softmax layer on the flattened image), client SGD at 0.02, server
SGD at 1.0, 10 rounds; it prints `round N, metrics=...` and follows the three metric families
it improves, each written to TensorBoard every round (`--logdir`):

  accuracy     client_work/train/* and the coordinator's held-out eval/*
  privacy      aggregator/dp/* (epsilon, clip, noise) with `--dp`:
               tff.learning.dp_aggregator(noise_multiplier=0.3, clients_per_round=...)
               (the article's 1.0 is for DP-SGD on one machine; TFF's adaptive clipping
               refuses a multiplier of 0.1 x clients per round or more)
  overhead     broadcasted_bits and aggregated_bits, cumulative

and ends with its model personalization: the final global model fine-tuned for 5 epochs on
one phone's data, evaluated on that phone's own held-out fifth before and after.

    python examples/metrics_tensorboard.py [--emnist-dir DIR] [--dp] [--quick] [--logdir DIR]
"""

from __future__ import annotations

import pathlib

import tutorial_support as tutorial

NUM_ROUNDS = 10
NUM_CLIENTS = 10
PERSONALIZATION_EPOCHS = 5


def main() -> None:
    options = tutorial.parser(__doc__, rounds=NUM_ROUNDS, phones=NUM_CLIENTS)
    options.add_argument("--logdir", type=pathlib.Path, default=pathlib.Path("/tmp/logs/metrics"))
    options.add_argument("--dp", action="store_true", help="train with tff.learning.dp_aggregator")
    args = options.parse_args()
    if args.quick:
        args.rounds, args.phones = 2, 4
    clients_per_round = min(NUM_CLIENTS, args.phones)
    deadlines = tutorial.deadlines(args)
    data = tutorial.load(args)

    import numpy as np
    import tensorflow as tf
    import tensorflow_federated as tff

    def create_keras_model() -> tf.keras.Model:
        return tf.keras.models.Sequential(
            [
                tf.keras.layers.Flatten(input_shape=data.image_shape),
                tf.keras.layers.Dense(data.num_classes, activation="softmax"),
            ]
        )

    aggregator = (
        tff.learning.dp_aggregator(noise_multiplier=0.3, clients_per_round=clients_per_round)
        if args.dp
        else None
    )
    with tutorial.coordinator(args, data) as deployment:
        task = deployment.client.create_task(
            tutorial.task_id("metrics"),
            population=args.population,
            model=create_keras_model,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(),
            client_optimizer=lambda: tf.keras.optimizers.SGD(learning_rate=0.02),
            server_optimizer=lambda: tf.keras.optimizers.SGD(learning_rate=1.0),
            aggregator=aggregator,
            rounds=args.rounds,
            clients_per_round=clients_per_round,
            over_selection=1.0,
            epochs=1,
            batch_size=20,
            selection_deadline_s=deadlines.selection_s,
            reporting_deadline_s=deadlines.reporting_s,
        )
        summary_writer = tf.summary.create_file_writer(str(args.logdir / task.task_id))
        with summary_writer.as_default(), deployment.phones():
            for result in task.rounds(progress=False):
                if not result.committed:
                    print(f"round {result.round_number} {result.state}: retried")
                    continue
                print(f"round {result.round_number}, metrics={result.tff_metrics}", flush=True)
                for name, value in result.metrics.items():
                    tf.summary.scalar(name, value, step=result.round_number)
        summary_writer.flush()
        print(f"TensorBoard: tensorboard --logdir {args.logdir}")

        # Personalization, as the article's personalize_model(global_model, client_data).
        global_model = task.keras_model()
        phone = data.clients[0]
        order = np.random.default_rng(args.seed).permutation(len(phone.y))
        cut = len(order) * 4 // 5
        train, held = order[:cut], order[cut:]
        client_model = create_keras_model()
        client_model.set_weights(global_model.get_weights())
        client_model.compile(
            optimizer=tf.keras.optimizers.SGD(learning_rate=0.02),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(),
            metrics=["accuracy"],
        )
        _, before = client_model.evaluate(phone.x[held], phone.y[held], verbose=0)
        client_model.fit(phone.x[train], phone.y[train], epochs=PERSONALIZATION_EPOCHS, verbose=0)
        _, after = client_model.evaluate(phone.x[held], phone.y[held], verbose=0)
        print(
            f"personalized phone 0 ({PERSONALIZATION_EPOCHS} local epochs): accuracy on its "
            f"held-out examples {before:.4f} -> {after:.4f}"
        )


if __name__ == "__main__":
    main()
